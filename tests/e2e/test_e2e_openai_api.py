"""The OpenAI API through one gateway and the real SmolLM2 worker, with the openai SDK as client.

One gateway for the module (never idle); the first test meets the model cold.
"""

from __future__ import annotations

import json
import threading

import openai
import pytest

from e2e_harness import launch_gateway, model_config

# the default model is llama.cpp's Q4_1 SmolLM2: asked for France's capital it greedily says
# "L'Étoile, la Marseillaise..." (the dequantized weights on the native engine say Paris); Berlin holds on both
CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config())
    yield gateway
    gateway.stop()


@pytest.mark.timeout(300)
def test_cold_start_is_held_then_answered(gw, openapi_validate):
    assert gw.replica()["state"] == "cold"
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=30)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    assert "Berlin" in body["choices"][0]["message"]["content"]
    assert body["model"] == "smollm2"
    assert body["usage"]["completion_tokens"] > 0
    assert gw.replica()["state"] == "ready"
    assert gw.metric("dormant:cold_start_seconds_count", model="smollm2", tier="cold") == 1
    assert gw.metric("dormant:state_transitions_total", model="smollm2", from_state="cold", to_state="starting") == 1


@pytest.mark.timeout(120)
def test_stream_with_usage(gw, openapi_validate):
    chunks = list(gw.openai().chat.completions.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in content)
    assert "Berlin" in "".join(c.choices[0].delta.content or "" for c in content)
    # The raw stream: every event validates, and it ends with [DONE].
    with gw.http_stream("/v1/chat/completions", {
            "model": "smollm2", "messages": CAPITAL, "temperature": 0, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}) as events:
        events = list(events)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        openapi_validate("CreateChatCompletionStreamResponse", json.loads(event))


@pytest.mark.timeout(120)
def test_stream_without_usage_gets_no_usage_chunk_but_counts_tokens(gw):
    before = gw.metric("dormant:generation_tokens_total", model="smollm2")
    chunks = list(gw.openai().chat.completions.create(
        model="tiny", messages=CAPITAL, temperature=0, max_tokens=12, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)
    assert gw.metric("dormant:generation_tokens_total", model="smollm2") > before


@pytest.mark.timeout(120)
def test_completions_plain_and_streamed(gw, openapi_validate):
    raw = gw.openai().completions.with_raw_response.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8)
    body = raw.http_response.json()
    openapi_validate("CreateCompletionResponse", body)
    assert body["choices"][0]["text"]
    with gw.http_stream("/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                            "temperature": 0, "max_tokens": 8, "stream": True}) as events:
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
    for chunk in chunks:
        # The spec has one schema for answers and chunks, with no null finish_reason; OpenAI's
        # streams (and vLLM's) send null until the last chunk, and so do we.
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        openapi_validate("CreateCompletionResponse", {**chunk, "choices": choices})
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == body["choices"][0]["text"]


@pytest.mark.timeout(60)
def test_models_list(gw, openapi_validate):
    body = gw.http("GET", "/v1/models").json()
    openapi_validate("ListModelsResponse", body)
    assert [m.id for m in gw.openai().models.list()] == ["smollm2"]


@pytest.mark.timeout(60)
def test_alias_routes_to_the_spec(gw):
    reply = gw.openai().chat.completions.create(model="tiny", messages=CAPITAL, temperature=0, max_tokens=4)
    assert reply.model == "smollm2"


@pytest.mark.timeout(60)
def test_unknown_model_is_404(gw, openapi_validate):
    with pytest.raises(openai.NotFoundError) as err:
        gw.openai().chat.completions.create(model="gpt-nope", messages=CAPITAL)
    body = err.value.response.json()
    openapi_validate("ErrorResponse", body)
    assert body["error"]["code"] == "model_not_found"


@pytest.mark.timeout(60)
def test_bad_input_is_400_naming_the_param(gw, openapi_validate):
    with pytest.raises(openai.BadRequestError) as err:
        gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=5)
    openapi_validate("ErrorResponse", err.value.response.json())
    assert err.value.response.json()["error"]["param"] == "temperature"
    r = gw.http("POST", "/v1/chat/completions", content=b'{"model": "smollm2", "messages": [', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = gw.http("POST", "/v1/completions", json={"model": "smollm2", "prompt": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


@pytest.mark.timeout(60)
def test_metrics_exposition(gw):
    text = gw.http("GET", "/metrics").text
    for name in ("dormant:time_to_first_token_seconds_bucket", "dormant:e2e_request_latency_seconds_count",
                 "dormant:request_queue_time_seconds_sum", "dormant:prompt_tokens_total",
                 "dormant:generation_tokens_total", "dormant:num_requests_running",
                 "dormant:num_requests_waiting", "dormant:cold_start_seconds_count",
                 "dormant:state_transitions_total"):
        assert f'{name}{{model="smollm2"' in text, name
    assert "# TYPE dormant:time_to_first_token_seconds histogram" in text
    assert gw.metric("dormant:prompt_tokens_total", model="smollm2") > 0


@pytest.mark.timeout(120)
def test_a_plain_answers_first_token_time_is_its_first_token_not_its_end(gw):
    def sums():
        return {name: gw.metric(f"dormant:{name}_sum", model="smollm2")
                for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds")}

    before = sums()
    count = gw.metric("dormant:time_to_first_token_seconds_count", model="smollm2")
    gw.openai().completions.create(model="smollm2", prompt="Count: one, two,", max_tokens=48, temperature=0,
                                   extra_body={"ignore_eos": True})
    after = sums()
    assert gw.metric("dormant:time_to_first_token_seconds_count", model="smollm2") == count + 1
    ttft = after["time_to_first_token_seconds"] - before["time_to_first_token_seconds"]
    e2e = after["e2e_request_latency_seconds"] - before["e2e_request_latency_seconds"]
    assert 0 < ttft < e2e  # 47 more tokens came after the first


@pytest.mark.timeout(300)
def test_concurrent_requests_during_a_start_share_one_worker(gw):
    assert gw.http("POST", "/unload", json={"model": "smollm2"}).json() == {"unloaded": ["smollm2"]}
    assert gw.replica()["state"] == "stopped" and gw.replica()["pid"] is None
    starts = gw.metric("dormant:state_transitions_total", model="smollm2", to_state="starting")
    answers: list[str] = []
    pids: set[int] = set()

    def ask() -> None:
        reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=12)
        answers.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if (pid := gw.replica()["pid"]) is not None:
            pids.add(pid)
        threads[0].join(0.05)
    for t in threads:
        t.join()
    assert len(answers) == 3 and len(set(answers)) == 1
    assert len(pids) == 1
    assert gw.metric("dormant:state_transitions_total", model="smollm2", to_state="starting") == starts + 1
