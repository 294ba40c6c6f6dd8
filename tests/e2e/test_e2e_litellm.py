"""LiteLLM against a real `dormant serve`, as its users point it at an OpenAI-compatible server:
`litellm.completion(model="openai/<id>", api_base=..., api_key=...)`, and its `hosted_vllm/`
provider (issue 11). Chat, streaming, tools and response_format json_schema, whole and
streamed, with LiteLLM's own parsing of the answers.

The model is the tool-capable copy of SmolLM2 (e2e_harness.tool_model_folder), so one worker
serves every test; its calls are valid because tool_choice required / named and json_schema are
kept to by the sampler, and only shapes are asserted, never SmolLM2's exact words.
"""

from __future__ import annotations

import json
import os

import pytest
from pydantic import BaseModel, Field

from e2e_harness import launch_gateway, tool_model_folder

# LiteLLM fetches its model price list from GitHub at import unless told to use its own copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Say hello in three words."}]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def gw(home, model_dir, module_workdir):
    folder = tool_model_folder(model_dir, module_workdir / "smol-tools")
    models = {"smol-tools": {"source": str(folder), "sleep_after": -1, "stop_after": -1}}
    gateway = launch_gateway(module_workdir, home, {"models": models}, key="sk-litellm-test",
                             entry=("dormant.cli", "serve"))
    yield gateway
    gateway.stop()


def _complete(gw, provider: str = "openai", **kw):
    return litellm.completion(model=f"{provider}/smol-tools", api_base=gw.base_url + "/v1", api_key=gw.key,
                              num_retries=0, timeout=240, **kw)


@pytest.mark.parametrize("provider", ["openai", "hosted_vllm"])
def test_chat_whole_and_streamed(gw, provider):
    whole = _complete(gw, provider, messages=HELLO, temperature=0, max_tokens=12)
    choice = whole.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12

    chunks = list(_complete(gw, provider, messages=HELLO, temperature=0, max_tokens=12, stream=True,
                            stream_options={"include_usage": True}))
    assert len(chunks) > 2  # streamed piece by piece, not one block
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    rebuilt = litellm.stream_chunk_builder(chunks, messages=HELLO)
    assert rebuilt.choices[0].message.content == choice.message.content
    assert rebuilt.choices[0].finish_reason == choice.finish_reason
    assert rebuilt.usage.completion_tokens == whole.usage.completion_tokens


def test_a_wrong_key_is_litellms_authentication_error(gw):
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model="openai/smol-tools", api_base=gw.base_url + "/v1", api_key="sk-wrong",
                           messages=HELLO, max_tokens=4, num_retries=0)


@pytest.mark.parametrize(("stream", "tool_choice"), [
    (False, {"type": "function", "function": {"name": "get_weather"}}),
    (True, "required"),
])
def test_a_forced_call_comes_back_as_tool_calls(gw, stream, tool_choice):
    # parallel_tool_calls false: left free, SmolLM2 starts a second call and max_tokens cuts it
    result = _complete(gw, messages=ASK, tools=[WEATHER], tool_choice=tool_choice, parallel_tool_calls=False,
                       temperature=0, max_tokens=60, stream=stream)
    reply = litellm.stream_chunk_builder(list(result), messages=ASK) if stream else result
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert not choice.message.content  # the call is not left as text too


def test_tool_results_in_the_history_are_accepted(gw):
    """A second turn as LiteLLM's docs write the agent loop: the reply's message appended as it
    is, then the tool's answer."""
    first = _complete(gw, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                      temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message,
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = _complete(gw, messages=history, tools=[WEATHER], temperature=0, max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result reached the prompt: ASK and the tools, then both, then the new turn
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_a_model_refusing_a_field_is_litellms_bad_request(gw):
    with pytest.raises(litellm.BadRequestError) as err:
        _complete(gw, messages=ASK, tools=[WEATHER], max_tokens=5,
                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "tool_choice" in str(err.value)


@pytest.mark.parametrize(("stream", "as_class"), [(False, True), (True, False)])
def test_response_format_json_schema(gw, stream, as_class):
    """As a pydantic class (LiteLLM turns it into json_schema) and as the dict itself."""
    ask = [{"role": "user", "content": "Paris is a city in France. Give the city as JSON."}]
    schema = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": City.model_json_schema()}}
    result = _complete(gw, messages=ask, response_format=City if as_class else schema, temperature=0, max_tokens=60,
                       stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in result if c.choices) if stream \
        else result.choices[0].message.content
    City.model_validate_json(text)
