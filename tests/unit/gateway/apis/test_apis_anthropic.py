"""Anthropic Messages <-> chat/completions, on canned bodies and chunks (no processes)."""

from __future__ import annotations

import json

import pytest

from dormant.errors import InvalidRequest, ModelUnavailable
from dormant.gateway.apis import anthropic
from dormant.gateway.apis.chat import Reply, ToolCall, read_reply

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_text_system_and_sampling_fields_map_onto_chat():
    payload = anthropic.to_chat({
        "model": "m", "max_tokens": 20, "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]},
                     {"role": "user", "content": [{"type": "text", "text": "More"}]}],
        "stop_sequences": ["\n\n"], "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stream": True,
        "metadata": {"user_id": "u1"}})
    assert payload["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "More"}]
    assert (payload["max_tokens"], payload["stop"], payload["temperature"], payload["top_p"], payload["top_k"],
            payload["stream"]) == (20, ["\n\n"], 0.5, 0.9, 5, True)


def test_tools_tool_use_and_tool_result_map_onto_chat_tools():
    payload = anthropic.to_chat({
        "model": "m", "max_tokens": 20, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather",
                                                                           "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "Sunny"}]},
                                         {"type": "text", "text": "And tomorrow?"}]}]})
    assert payload["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["input_schema"]}}]
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert payload["parallel_tool_calls"] is False
    assistant, tool, user = payload["messages"][1:]
    assert assistant == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}
    assert user == {"role": "user", "content": "And tomorrow?"}
    assert anthropic.to_chat({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                              "tool_choice": {"type": "any"}})["tool_choice"] == "required"


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled"}}, "thinking"),
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "bash_20250124",
                                                                                  "name": "bash"}]}, "tools[0].type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "metadata": {"tier": "gold"}}, "metadata.tier"),
])
def test_what_is_not_acted_on_is_refused_by_name(body, param):
    with pytest.raises(InvalidRequest) as err:
        anthropic.to_chat({"model": "m", **body})
    assert err.value.param == param


def test_reply_becomes_a_message_with_tool_use_blocks():
    reply = Reply("Checking.", [ToolCall("call_1", "get_weather", '{"city": "Paris"}')], "tool_calls", 7, 3)
    message = anthropic.from_reply(reply, "m", "msg_1")
    assert message["content"] == [{"type": "text", "text": "Checking."},
                                  {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert message["stop_reason"] == "tool_use" and message["usage"] == {"input_tokens": 7, "output_tokens": 3}
    assert anthropic.from_reply(Reply("x", [], "length"), "m", "msg_2")["stop_reason"] == "max_tokens"


def test_a_stop_sequence_is_named_whole_and_streamed():
    stopped = anthropic.from_reply(read_reply({"choices": [{"message": {"content": "One, two"}, "finish_reason": "stop",
                                                            "stop_reason": ", three"}]}), "m", "msg_1")
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", ", three")
    ended = anthropic.from_reply(Reply("Done.", [], "stop"), "m", "msg_2")
    assert (ended["stop_reason"], ended["stop_sequence"]) == ("end_turn", None)
    s = anthropic.MessageStream("m", "msg_3")
    frames = s.feed({"choices": [{"delta": {"content": "One, two"}}]})
    frames += s.feed({"choices": [{"delta": {}, "finish_reason": "stop", "stop_reason": ", three"}]})
    (delta,) = [d for e, d in _events(frames + s.finish()) if e == "message_delta"]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ", three"}


def _events(frames: list[bytes]) -> list[tuple[str, dict]]:
    out = []
    for frame in frames:
        event, data = frame.decode().strip().split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_stream_has_anthropics_event_sequence_with_text_then_tool_use():
    s = anthropic.MessageStream("m", "msg_1")
    frames = s.held()
    for chunk in [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": "Let me"}}]}, {"choices": [{"delta": {"content": " check."}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                          "function": {"name": "get_weather", "arguments": ""}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
                  {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
                  {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}]:
        frames += s.feed(chunk)
    events = _events(frames + s.finish())
    assert [e for e, _ in events] == [
        "ping", "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[2][1]["content_block"] == {"type": "text", "text": ""} and events[2][1]["index"] == 0
    assert events[6][1]["content_block"]["type"] == "tool_use" and events[6][1]["index"] == 1
    assert events[6][1]["content_block"]["id"] == "call_1"
    assert "".join(d["delta"]["partial_json"] for e, d in events[7:9]) == '{"city":"Paris"}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 9, "output_tokens": 4}


def test_stream_error_is_an_anthropic_error_event():
    s = anthropic.MessageStream("m", "msg_1")
    s.feed({"choices": [{"delta": {"content": "a"}}]})
    (event,) = _events(s.error(ModelUnavailable("the worker died")))
    assert event == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "the worker died"}})
