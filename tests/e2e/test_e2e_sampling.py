"""Every sampling field through `dormant serve` and the real SmolLM2 worker, with the openai SDK
as client (issue 11, "Sampling" and "The rule"). Logprobs on the native engine (`native_gw`):
the llama.cpp default refuses them with a 400 naming the field (test_e2e_llamacpp.py)."""

from __future__ import annotations

import json
import math

import openai
import pytest
from e2e_harness import launch_gateway, model_config

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config())
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def native_gw(home, module_workdir):
    gateway = launch_gateway(module_workdir / "native", home, model_config(engine="native"))
    yield gateway
    gateway.stop()


@pytest.mark.timeout(300)
def test_chat_logprobs_and_top_logprobs(native_gw, openapi_validate):
    raw = native_gw.openai().chat.completions.with_raw_response.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert math.isclose(entry["top_logprobs"][0]["logprob"], entry["logprob"], abs_tol=1e-6)
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)
    plain = native_gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0,
                                                       max_tokens=8)
    assert plain.choices[0].logprobs is None


@pytest.mark.timeout(300)
def test_n_choices_and_a_batch_of_prompts(gw, openapi_validate):
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="smollm2", messages=CAPITAL, temperature=1.0, max_tokens=12, n=3, seed=7)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # seeds 7, 8, 9: three draws
    again = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=1.0, max_tokens=12, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c["message"]["content"] for c in body["choices"]]

    prompts = ["The capital of France is", "One, two, three,"]
    batch = gw.openai().completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    alone = [gw.openai().completions.create(model="smollm2", prompt=p, temperature=0, max_tokens=6).choices[0].text
             for p in prompts]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]
    ids = gw.openai().completions.create(model="smollm2", prompt=[[504, 3575, 282, 4649, 314], [504, 3575]],
                                         temperature=0, max_tokens=6)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 7
    assert ids.choices[0].text == alone[0]  # [504, 3575, 282, 4649, 314] is the first prompt's ids


@pytest.mark.timeout(300)
def test_streamed_choices_carry_their_index_and_logprobs(native_gw, openapi_validate):
    with native_gw.http_stream("/v1/chat/completions", {
            "model": "smollm2", "messages": CAPITAL, "temperature": 0, "max_tokens": 6, "stream": True,
            "n": 2, "logprobs": True, "top_logprobs": 2}) as events:
        events = list(events)
    assert events[-1] == "[DONE]"
    text = {0: "", 1: ""}
    tokens = {0: "", 1: ""}
    for event in events[:-1]:
        chunk = json.loads(event)
        openapi_validate("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["delta"].get("content") or ""
            for entry in (choice["logprobs"] or {}).get("content") or []:
                tokens[choice["index"]] += entry["token"]
    assert text[0] == text[1] and text[0] and tokens[0] == text[0]
    streamed = native_gw.openai().completions.create(model="smollm2", prompt="The capital of France is",
                                                     temperature=0, max_tokens=6, n=2, logprobs=2, stream=True)
    per_index: dict[int, list[float]] = {0: [], 1: []}
    for chunk in streamed:
        for choice in chunk.choices:
            per_index[choice.index] += choice.logprobs.token_logprobs if choice.logprobs else []
    assert len(per_index[0]) == len(per_index[1]) == 6


@pytest.mark.timeout(300)
def test_echo_with_logprobs_gives_the_prompt_logprobs(native_gw):
    prompt = "The capital of France is Paris"
    out = native_gw.openai().completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=1,
                                                echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    num_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 1 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    # " Paris" after "The capital of France is" is likely; "Berlin" less so
    worse = native_gw.openai().completions.create(model="smollm2", prompt="The capital of France is Berlin",
                                                  temperature=0, max_tokens=1, echo=True, logprobs=0)
    assert lp.token_logprobs[num_prompt - 1] > worse.choices[0].logprobs.token_logprobs[num_prompt - 1]


@pytest.mark.timeout(300)
def test_penalties_bias_and_vllm_fields_change_greedy_output(gw):
    client = gw.openai()
    ask = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 16}
    plain = client.completions.create(**ask).choices[0].text
    assert client.completions.create(**ask, frequency_penalty=2.0).choices[0].text != plain
    assert client.completions.create(**ask, presence_penalty=2.0).choices[0].text != plain
    assert client.completions.create(**ask, extra_body={"repetition_penalty": 2.0}).choices[0].text != plain
    biased = client.completions.create(**{**ask, "max_tokens": 1}, logit_bias={"21285": 100}).choices[0].text
    assert biased == " banana"  # token 21285 in SmolLM2's vocabulary
    sampled = {**ask, "temperature": 1.0, "seed": 3}
    assert client.completions.create(**sampled, extra_body={"top_k": 1}).choices[0].text == plain
    assert client.completions.create(**sampled, extra_body={"min_p": 1.0}).choices[0].text == plain
    assert client.completions.create(**ask, stop=[" 7", " 8", " 9", " 10", " 11"]).choices[0].text == plain.split(" 7")[0]


@pytest.mark.timeout(300)
def test_best_of_returns_the_likeliest(native_gw):
    client = native_gw.openai()
    out = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=1.0,
                                    max_tokens=6, n=1, best_of=4, seed=1, logprobs=0)
    assert len(out.choices) == 1
    each = [client.completions.create(model="smollm2", prompt="The capital of France is", temperature=1.0,
                                      max_tokens=6, seed=1 + i, logprobs=0).choices[0] for i in range(4)]
    best = max(each, key=lambda c: sum(c.logprobs.token_logprobs))
    assert out.choices[0].text == best.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": CAPITAL, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": CAPITAL, "functions": []}, "functions"),
    ("/v1/chat/completions", {"messages": [{**CAPITAL[0], "audio": {}}]}, "messages[0].audio"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 1, "n": 2}, "best_of"),
    ("/v1/chat/completions", {"messages": CAPITAL, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 5}}, "logit_bias"),
])
def test_a_field_nothing_acts_on_is_a_400_naming_it(gw, path, body, param):
    r = gw.http("POST", path, json={"model": "smollm2", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, extra_body={"frobnicate": 1})


@pytest.mark.timeout(120)
def test_fields_the_spec_lets_us_ignore_are_taken(gw):
    out = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=2, user="u-1",
                                              metadata={"k": "v"}, store=False, service_tier="auto")
    assert out.choices[0].message.content
