"""Structured output through `dormant serve` and the real SmolLM2, as clients ask for it: the
openai SDK's `parse`, response_format json_object, vLLM's structured_outputs, and LangChain's
`with_structured_output` (json_schema and json_mode)."""

from __future__ import annotations

import json
import re

import openai
import pytest
from pydantic import BaseModel, Field

from e2e_harness import launch_gateway, model_config

pytestmark = pytest.mark.timeout(300)


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=1000)  # bounded: a small model may otherwise write digits on


ASK_CITY = [{"role": "user", "content": "Tell me about Paris as JSON."}]
# SmolLM2 (135M) left to itself repeats keys until max_tokens; a JSON to copy ends
COPY_JSON = 'Reply with exactly this JSON and nothing else: {"city": "Paris", "country": "France"}'



@pytest.fixture(scope="module")
def gw(home, module_workdir):
    # engine native: constrained decoding is its own; llama.cpp refuses it with a 400 naming the
    # field (test_e2e_llamacpp.py)
    gateway = launch_gateway(module_workdir, home, model_config(engine="native"), entry=("dormant.cli", "serve"))
    yield gateway
    gateway.stop()


def test_the_sdks_parse_returns_the_pydantic_object(gw, openapi_validate):
    raw = gw.openai().chat.completions.with_raw_response.parse(
        model="smollm2", messages=ASK_CITY, response_format=City, temperature=0, max_tokens=80)
    openapi_validate("CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    city = completion.choices[0].message.parsed
    assert isinstance(city, City), completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_is_valid_json_plain_and_streamed(gw):
    client = gw.openai()
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": COPY_JSON}], "temperature": 0, "max_tokens": 80,
           "response_format": {"type": "json_object"}}
    answer = client.chat.completions.create(**ask)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == answer.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_choice_and_regex_are_honoured(gw, stream):
    client = gw.openai()

    def ask(extra: dict, **kw) -> str:
        kw = {"model": "smollm2", "temperature": 0.9, "seed": 7, "max_tokens": 20, "extra_body": extra, **kw}
        if kw.pop("completion", False):
            if not stream:
                return client.completions.create(prompt="The answer is", **kw).choices[0].text
            return "".join(c.choices[0].text for c in client.completions.create(prompt="The answer is", stream=True, **kw))
        messages = [{"role": "user", "content": "Is water wet?"}]
        if not stream:
            return client.chat.completions.create(messages=messages, **kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(messages=messages, stream=True, **kw) if c.choices)

    assert ask({"structured_outputs": {"choice": ["yes", "no", "it depends"]}}) in ("yes", "no", "it depends")
    assert re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", ask({"structured_outputs": {"regex": r"[A-Z][a-z]{2,5} [0-9]{2}"}}))
    assert ask({"guided_choice": ["left", "right"]}, completion=True) in ("left", "right")


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_schema_or_regex_is_a_400_naming_the_param(gw, stream):
    client = gw.openai()
    base = {"model": "smollm2", "messages": ASK_CITY, "max_tokens": 5, "stream": stream}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: nosuchrule"}}}, "structured_outputs.grammar"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "[0-9]+"}}, "guided_regex"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**base, **extra)
        assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


def test_langchain_with_structured_output(gw):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2", base_url=gw.base_url + "/v1", api_key="unused", temperature=0,
                     max_tokens=80, max_retries=0)
    city = llm.with_structured_output(City, method="json_schema").invoke("Paris, in France, has 2 million people. Give the city as JSON.")
    assert isinstance(city, City)
    anything = llm.with_structured_output(None, method="json_mode").invoke(COPY_JSON)
    assert isinstance(anything, dict)
