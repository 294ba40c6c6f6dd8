"""The other APIs on the gateway's port, with their own clients against a real gateway and the
real SmolLM2 worker: the anthropic SDK (/v1/messages), the ollama client (/api/*), the openai
SDK's Responses, /tokenize and /detokenize, /v1/models/{id}, CORS and x-api-key.

One gateway for the module, with an API key and one allowed origin; the first test sees the
model cold, before any start.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import pytest

from e2e_harness import launch_gateway, model_config

KEY = "sk-apis-test"
ORIGIN = "https://app.example"
QUESTION = "What is the capital of Germany?"  # see test_e2e_openai_api.py: llama.cpp's Q4_1 says Berlin


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, {**model_config(), "allowed_origins": [ORIGIN]}, key=KEY)
    yield gateway
    gateway.stop()


def _anthropic(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120)


def _ollama(gw) -> ollama.Client:
    return ollama.Client(host=gw.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.mark.timeout(300)  # the session may import SmolLM2 first
def test_models_say_max_model_len_before_any_start(gw, openapi_validate):
    assert gw.replica()["state"] == "cold"
    card = gw.http("GET", "/v1/models/smollm2").json()
    openapi_validate("Model", card)
    assert card["id"] == "smollm2" and card["object"] == "model"
    assert card["max_model_len"] == 2048  # SmolLM2's 8192 capped at the llama.cpp engine's default
    listed = gw.http("GET", "/v1/models").json()["data"]
    assert [m["max_model_len"] for m in listed] == [2048]
    missing = gw.http("GET", "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert gw.replica()["state"] == "cold"  # nothing was started to answer
    assert gw.http("GET", "/version").json()["version"]


@pytest.mark.timeout(300)
def test_anthropic_messages_plain_with_x_api_key(gw):
    message = _anthropic(gw).messages.create(
        model="smollm2", max_tokens=30, stop_sequences=["\n\n"],
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 0, "top_k": 1})  # this SDK no longer names them; older ones send them
    assert message.type == "message" and message.role == "assistant"
    assert "Berlin" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


@pytest.mark.timeout(120)
def test_anthropic_messages_streamed(gw):
    with _anthropic(gw).messages.stream(
            model="smollm2", max_tokens=5, extra_body={"temperature": 0},
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    with httpx.stream("POST", gw.base_url + "/v1/messages", headers={"x-api-key": KEY}, timeout=120, json={
            "model": "smollm2", "max_tokens": 3, "stream": True, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": "Hi"}]}) as r:
        kinds = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "content_block_stop" in kinds


@pytest.mark.timeout(120)
def test_a_stop_sequence_is_named_anthropics_way_and_vllms(gw):
    """The stop string that ended an answer: Anthropic's stop_reason stop_sequence with the
    string, whole and streamed; on chat/completions, vLLM's `stop_reason` on the choice."""
    ask = {"model": "smollm2", "max_tokens": 30, "stop_sequences": ["Berlin"], "extra_body": {"temperature": 0},
           "messages": [{"role": "user", "content": QUESTION}]}
    message = _anthropic(gw).messages.create(**ask)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Berlin")
    assert "Berlin" not in message.content[0].text
    with _anthropic(gw).messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Berlin")
    chat = gw.openai().chat.completions.create(model="smollm2", max_tokens=30, stop=["Paris", "Berlin"], temperature=0,
                                               messages=[{"role": "user", "content": QUESTION}])
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].model_extra["stop_reason"] == "Berlin"
    free = gw.openai().chat.completions.create(model="smollm2", max_tokens=2, temperature=0,
                                               messages=[{"role": "user", "content": QUESTION}])
    assert free.choices[0].model_extra["stop_reason"] is None


@pytest.mark.timeout(60)
def test_anthropic_errors_have_anthropics_shape(gw):
    with pytest.raises(anthropic.BadRequestError) as err:
        _anthropic(gw).messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"thinking": {"type": "enabled", "budget_tokens": 10}})
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error" and "thinking" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.base_url, api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.NotFoundError):
        _anthropic(gw).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.timeout(120)
def test_ollama_chat_and_generate(gw):
    client = _ollama(gw)
    reply = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                        options={"temperature": 0, "num_predict": 30}, keep_alive="10m")
    assert "Berlin" in reply.message.content and reply.done and reply.eval_count > 0
    parts = list(client.chat(model="smollm2:latest", messages=[{"role": "user", "content": QUESTION}],
                             options={"temperature": 0, "num_predict": 5}, stream=True))
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 5
    assert "".join(p.message.content for p in parts)
    generated = client.generate(model="smollm2", prompt=QUESTION, options={"temperature": 0, "num_predict": 30})
    assert "Berlin" in generated.response and generated.done
    streamed = list(client.generate(model="smollm2", prompt="The capital of France is", raw=True, stream=True,
                                    options={"temperature": 0, "num_predict": 4}))
    assert streamed[-1].done and "".join(p.response for p in streamed)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="smollm2", messages=[{"role": "user", "content": "Hi"}], options={"mirostat": 1})
    assert err.value.status_code == 400 and "mirostat" in err.value.error


@pytest.mark.timeout(60)
def test_ollama_list_ps_show_version(gw):
    client = _ollama(gw)
    tags = client.list()
    assert [m.model for m in tags.models] == ["smollm2"]
    assert tags.models[0].size > 0 and tags.models[0].details.family == "llama"
    # the llama.cpp engine serves the GGUF itself: its figures, not a dequantized copy's
    details = tags.models[0].details
    assert (details.format, details.quantization_level, details.parameter_size) == ("gguf", "Q4_1", "134.5M")
    client.generate(model="smollm2", prompt="", keep_alive="5m")  # Ollama's preload: the model is ready
    running = client.ps()
    assert [m.model for m in running.models] == ["smollm2"] and running.models[0].context_length == 2048
    shown = client.show("smollm2")
    assert shown.modelinfo["general.architecture"] == "llama" and shown.template
    assert shown.modelinfo["general.parameter_count"] == 134_515_008  # the GGUF's tensors
    assert "completion" in shown.capabilities
    assert gw.http("GET", "/api/version").json()["version"]


@pytest.mark.timeout(120)
def test_openai_responses_plain_and_streamed(gw, openapi_validate):
    client = gw.openai()
    raw = client.responses.with_raw_response.create(
        model="smollm2", input=QUESTION, max_output_tokens=30, temperature=0)
    openapi_validate("Response", raw.http_response.json())
    response = raw.parse()
    assert "Berlin" in response.output_text and response.usage.output_tokens > 0
    events = list(client.responses.create(
        model="smollm2", input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        instructions="You answer briefly.", max_output_tokens=5, temperature=0, stream=True))
    for event in events:
        openapi_validate("ResponseStreamEvent", event.model_dump(mode="json", exclude_unset=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output[0].content[0].text == text
    bad = gw.http("POST", "/v1/responses", json={"model": "smollm2", "input": "Hi", "previous_response_id": "r"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "previous_response_id"


@pytest.mark.timeout(60)
def test_tokenize_detokenize_round_trip(gw):
    text = "The capital of France is Paris."
    tokens = gw.http("POST", "/tokenize", json={"model": "smollm2", "prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 0
    assert tokens["max_model_len"] == 2048
    assert tokens["token_strs"][:3] == ["The", "Ġcapital", "Ġof"]  # the vocabulary's spelling, as transformers
    back = gw.http("POST", "/detokenize", json={"model": "smollm2", "tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    chat = gw.http("POST", "/tokenize", json={"model": "smollm2", "messages": [{"role": "user", "content": text}]})
    assert chat.json()["count"] > tokens["count"]  # the chat template's tokens around the text
    bad = gw.http("POST", "/detokenize", json={"model": "smollm2", "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.timeout(30)
def test_cors_preflight_and_key(gw):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(gw.base_url + "/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(gw.base_url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    no_key = httpx.get(gw.base_url + "/v1/models", headers={"Origin": ORIGIN})
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == ORIGIN
    with_key = httpx.get(gw.base_url + "/v1/models", headers={"Origin": ORIGIN, "x-api-key": KEY})
    assert with_key.status_code == 200 and with_key.headers["access-control-allow-origin"] == ORIGIN
    ollama_401 = httpx.get(gw.base_url + "/api/tags")
    assert ollama_401.status_code == 401 and isinstance(ollama_401.json()["error"], str)
    assert json.loads(httpx.get(gw.base_url + "/health").text) == {"status": "ok"}


@pytest.mark.timeout(120)
def test_ollama_keep_alive_sets_the_expiry_and_zero_unloads(gw):
    """Ollama's keep_alive, as its client sends it: a chat's keep_alive is when /api/ps says
    the model goes; an empty generate with keep_alive 0 unloads it (last: the model is stopped)."""
    import datetime as dt

    client = _ollama(gw)
    client.chat(model="smollm2", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1},
                keep_alive="7m")
    (running,) = client.ps().models
    left = (running.expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 6 * 60 < left <= 7 * 60, running.expires_at
    gone = client.generate(model="smollm2", prompt="", keep_alive=0)
    assert gone.done and gone.done_reason == "unload"
    assert client.ps().models == [] and gw.replica()["state"] in ("stopped", "hibernated")
