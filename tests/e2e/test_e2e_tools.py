"""Tool calling against a real `dormant serve`, with the openai SDK and LangChain as clients.

The model is SmolLM2 given a Hermes (Qwen-format) tool template of our own writing
(tests/data/hermes_tools.jinja), in a model folder made here; SmolLM2 itself, whose template
has no tools, is served beside it. Forced calls (tool_choice required / named) are valid
because the sampler keeps to their grammar; in `auto` the 135M model only calls a tool when
the conversation shows it how: after two questions each answered by a call (CALLS_SHOWN), it
calls for the third city. A call and its result in the history (REPEAT) it answers in text.
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


def _weather_call(i: int, city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city})}}]}


CALLS_SHOWN = [{"role": "user", "content": "What is the weather in Paris?"}, _weather_call(1, "Paris"),
               {"role": "user", "content": "What is the weather in London?"}, _weather_call(2, "London"),
               {"role": "user", "content": "What is the weather in Rome?"}]


@pytest.fixture(scope="module")
def gw(home, model_dir, module_workdir):
    folder = tool_model_folder(model_dir, module_workdir / "smol-tools")
    # as a Qwen3 model is served: its tool calls and its thinking parsed (the parser of the
    # calls is found in the template; the reasoning parser is named)
    models = {"smol-tools": {"source": str(folder), "sleep_after": -1, "stop_after": -1, "reasoning_parser": "qwen3"},
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
    """tool_choice auto: the call the model writes comes back parsed (whole and streamed)
    rather than as text; a call and its result in the history render (the model answers them)."""
    client = gw.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="smol-tools", messages=CALLS_SHOWN, tools=[WEATHER], temperature=0, max_tokens=60)
    body = raw.http_response.json()
    openapi_validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert "<tool_call>" not in (choice["message"]["content"] or "")  # a call is never left as text
    streamed = list(client.chat.completions.create(
        model="smol-tools", messages=CALLS_SHOWN, tools=[WEATHER], temperature=0, max_tokens=60, stream=True))
    for chunk in streamed:
        openapi_validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    pieces = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert content == (choice["message"]["content"] or "") and streamed[-1].choices[0].finish_reason == "tool_calls"
    assert [p.function.name for p in pieces if p.function.name] == ["get_weather"]
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Rome"}
    answer = client.chat.completions.create(model="smol-tools", messages=REPEAT, tools=[WEATHER], temperature=0,
                                            max_tokens=30)
    assert answer.choices[0].message.content


@pytest.mark.timeout(300)
def test_strict_tools_in_auto_hold_every_call_to_its_schema(gw):
    """tool_choice auto with a strict tool: the reply is free, and the call the model writes
    keeps to the schema (the grammar's own refusals: tests/unit/worker/test_tool_grammar.py)."""
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    client = gw.openai()
    for stream in (False, True):
        result = client.chat.completions.create(model="smol-tools", messages=CALLS_SHOWN, tools=[strict, CLOCK],
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
        assert "<tool_call>" not in text and calls
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


# ---- the same tools through the other APIs, with their own clients ---------------------------

ANTHROPIC_WEATHER = {"name": "get_weather", "description": WEATHER["function"]["description"],
                     "input_schema": WEATHER["function"]["parameters"]}


@pytest.mark.timeout(300)
def test_anthropic_sdk_tool_use_then_tool_result(gw):
    """tool_choice `tool` forces the call (a tool_use block, whole and streamed as
    input_json_delta); the call and its tool_result in the history are taken, and answered."""
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=240)
    ask = {"model": "smol-tools", "max_tokens": 60, "tools": [ANTHROPIC_WEATHER], "messages": ASK,
           "tool_choice": {"type": "tool", "name": "get_weather"}, "extra_body": {"temperature": 0}}
    message = client.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id and isinstance(use.input["city"], str)
    with client.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(use.name, use.input)]

    answer = client.messages.create(
        model="smol-tools", max_tokens=20, tools=[ANTHROPIC_WEATHER], extra_body={"temperature": 0}, messages=[
            *ASK, {"role": "assistant", "content": message.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use") and answer.content


@pytest.mark.timeout(300)
def test_responses_function_tools_then_function_call_output(gw, openapi_validate):
    """The openai SDK's Responses with a function tool: a forced call is a function_call item,
    whole and streamed (every event checked against the spec); the call and its output sent
    back as input items are answered."""
    client = gw.openai()
    tool = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"],
            "parameters": WEATHER["function"]["parameters"], "strict": True}
    ask = {"model": "smol-tools", "input": ASK[0]["content"], "tools": [tool], "tool_choice": "required",
           "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60}
    raw = client.responses.with_raw_response.create(**ask)
    openapi_validate("Response", raw.http_response.json())
    response = raw.parse()
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    assert response.status == "completed"

    events = list(client.responses.create(**ask, stream=True))
    for event in events:
        openapi_validate("ResponseStreamEvent", event.model_dump(mode="json", exclude_unset=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    streamed = [item for item in events[-1].response.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(call.name, call.arguments)]

    follow = client.responses.create(
        model="smol-tools", tools=[tool], temperature=0, max_output_tokens=20,
        input=[ASK[0], call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert follow.output and follow.status in ("completed", "incomplete")


def _ollama_message(message: dict) -> dict:
    """A chat message in Ollama's shape: calls without ids, their arguments objects."""
    out = {"role": message["role"], "content": message["content"] or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                           "arguments": json.loads(c["function"]["arguments"])}}
                             for c in message["tool_calls"]]
    return out


@pytest.mark.timeout(300)
def test_ollama_client_tools_and_tool_messages(gw):
    """The ollama client's tools: the call the model writes comes back as message.tool_calls,
    whole and streamed; a tool message answers the call before it by its tool_name."""
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=gw.base_url, timeout=240)
    history = [_ollama_message(m) for m in CALLS_SHOWN]
    reply = client.chat(model="smol-tools", messages=history, tools=[WEATHER], stream=False,
                        options={"temperature": 0, "num_predict": 60})
    calls = reply.message.tool_calls or []
    assert calls and calls[0].function.name == "get_weather", reply.message
    assert isinstance(calls[0].function.arguments["city"], str) and "<tool_call>" not in reply.message.content
    parts = list(client.chat(model="smol-tools", messages=history, tools=[WEATHER], stream=True,
                             options={"temperature": 0, "num_predict": 60}))
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in calls]
    assert parts[-1].done
    answered = client.chat(model="smol-tools", tools=[WEATHER], stream=False, options={"temperature": 0, "num_predict": 20},
                           messages=[*history[:2], {"role": "tool", "tool_name": "get_weather", "content": "sunny"}])
    assert answered.message.content and answered.done


@pytest.mark.timeout(300)
def test_reasoning_moves_thinking_out_of_content_and_template_kwargs_reach_the_template(gw):
    """The model's reasoning parser (qwen3): a think block goes to `reasoning_content`, whole
    and streamed as its own deltas before the answer's. SmolLM2 never thinks by itself, so a
    regex makes it write one. chat_template_kwargs enable_thinking false makes the template
    close an empty think block in the prompt (tests/data/hermes_tools.jinja): more prompt tokens."""
    client = gw.openai()
    ask = {"model": "smol-tools", "messages": [{"role": "user", "content": "Is water wet?"}], "temperature": 0,
           "max_tokens": 40, "extra_body": {"structured_outputs": {"regex": r"<think>\n[a-z ]{5,30}\n</think>\n\n(Yes|No)\."}}}
    whole = client.chat.completions.create(**ask)
    message = whole.choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert message.content in ("Yes.", "No.") and thinking.strip() and "<think>" not in thinking + message.content
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    kinds = [k for c in chunks for k in ("reasoning_content", "content")
             if (c.choices[0].delta.model_extra or {}).get(k) or getattr(c.choices[0].delta, k, None)]
    assert kinds == sorted(kinds, key=lambda k: k == "content") and "reasoning_content" in kinds  # thinking first
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks) == thinking
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content

    plain = {"model": "smol-tools", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    thinks = client.chat.completions.create(**plain).usage.prompt_tokens
    closed = client.chat.completions.create(**plain, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert closed.usage.prompt_tokens > thinks
