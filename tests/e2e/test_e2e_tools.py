"""Tool calling against a real `dormant serve`, with the openai SDK and LangChain as clients.

The model is SmolLM2 given a Hermes (Qwen-format) tool template of our own writing
(tests/data/hermes_tools.jinja), in a model folder made here; SmolLM2 itself, whose template
has no tools, is served beside it. Forced calls (tool_choice required / named) are valid
because the sampler keeps to their grammar; in `auto` the 135M model only calls a tool when
the conversation shows it how (a call in the history that it repeats).
"""

from __future__ import annotations

import json

import openai
import pytest

from e2e_harness import launch_gateway, tool_model_folder

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a call and its result in the history, then the same question: the model repeats the call
REPEAT = [*ASK,
          {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
              "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
          {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
          *ASK]


@pytest.fixture(scope="module")
def gw(home, model_dir, module_workdir):
    folder = tool_model_folder(model_dir, module_workdir / "smol-tools")
    models = {"smol-tools": {"source": str(folder), "sleep_after": -1, "stop_after": -1},
              "smollm2": {"source": "builtin:smollm2", "sleep_after": -1, "stop_after": -1}}
    gateway = launch_gateway(module_workdir, home, {"models": models})
    yield gateway
    gateway.stop()


def _args(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.timeout(300)
def test_required_gives_a_valid_call_whole_and_streamed(gw, openapi_validate):
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="smol-tools", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=60)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    if call.function.name == "get_weather":
        assert isinstance(_args(call)["city"], str)

    chunks = list(gw.openai().chat.completions.create(
        model="smol-tools", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=60, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert pieces[0].function.name == call.function.name and pieces[0].id and pieces[0].type == "function"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == _args(call)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.timeout(300)
def test_named_function_is_called(gw):
    for stream in (False, True):
        result = gw.openai().chat.completions.create(
            model="smol-tools", messages=ASK, tools=[CLOCK, WEATHER], temperature=0, max_tokens=60, stream=stream,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        if stream:
            chunks = list(result)
            pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            assert pieces[0].function.name == "get_weather"
            assert "city" in json.loads("".join(p.function.arguments or "" for p in pieces))
        else:
            (call,) = result.choices[0].message.tool_calls
            assert call.function.name == "get_weather" and "city" in _args(call)


@pytest.mark.timeout(300)
def test_auto_parses_a_call_the_model_writes_and_history_renders(gw, openapi_validate):
    """The history shows a call and its result; asked again, the model repeats the call, which
    comes back parsed (whole and streamed) rather than as text."""
    client = gw.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="smol-tools", messages=REPEAT, tools=[WEATHER], temperature=0, max_tokens=60)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    message = body["choices"][0]["message"]
    text = message["content"] or ""
    assert "<tool_call>" not in text  # a call is never left as text when it parses
    streamed = list(client.chat.completions.create(
        model="smol-tools", messages=REPEAT, tools=[WEATHER], temperature=0, max_tokens=60, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    pieces = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert content == text
    assert [p.function.name for p in pieces if p.function.name] == [c["function"]["name"] for c in message.get("tool_calls", [])]


@pytest.mark.timeout(300)
def test_strict_tools_in_auto_hold_every_call_to_its_schema(gw):
    """tool_choice auto with a strict tool: the reply is free, and the call the model writes
    keeps to the schema (the grammar's own refusals: tests/unit/worker/test_tool_grammar.py)."""
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    client = gw.openai()
    for stream in (False, True):
        result = client.chat.completions.create(model="smol-tools", messages=REPEAT, tools=[strict, CLOCK],
                                                temperature=0, max_tokens=60, stream=stream)
        if stream:
            chunks = list(result)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            calls = [(p.function.name, "".join(q.function.arguments or "" for q in pieces if q.index == p.index))
                     for p in pieces if p.function.name]
        else:
            message = result.choices[0].message
            text = message.content or ""
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert "<tool_call>" not in text
        for name, arguments in calls:
            args = json.loads(arguments)
            assert name in ("get_weather", "get_time")
            if name == "get_weather":
                assert isinstance(args["city"], str) and set(args) <= {"city", "days"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol-tools", messages=ASK, tools=[strict], max_tokens=5,
                                       response_format={"type": "json_object"})
    assert err.value.body["param"] == "tool_choice"


@pytest.mark.timeout(300)
def test_a_model_without_tool_support_refuses_tools(gw):
    with pytest.raises(openai.BadRequestError) as err:
        gw.openai().chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=5)
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as err:
        gw.openai().chat.completions.create(model="smol-tools", messages=ASK, tools=[WEATHER], max_tokens=5,
                                            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
    # tool_choice none: tools are not shown, so even SmolLM2 answers
    answer = gw.openai().chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="none",
                                                 max_tokens=5, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.timeout(300)
def test_langchain_bind_tools_and_structured_output(gw):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(model="smol-tools", base_url=gw.base_url + "/v1", api_key="unused",
                                      temperature=0, max_tokens=60)
    reply = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(description="the city")
        celsius: int

    found = llm.with_structured_output(Weather, method="function_calling").invoke("Paris is at 21 degrees.")
    assert isinstance(found, Weather) and isinstance(found.celsius, int)
