"""OpenAI Responses <-> chat/completions, on canned bodies and chunks (no processes)."""

from __future__ import annotations

import json

import pytest

from dormant.errors import InvalidRequest
from dormant.gateway.apis import openai_responses as responses
from dormant.gateway.apis.chat import Reply, ToolCall
from dormant.protocol import ChatCompletionRequest, parse_request

TOOL = {"type": "function", "name": "add", "parameters": {"type": "object"}, "strict": True}


def test_what_the_spec_lets_a_server_ignore_is_handed_to_chat_which_logs_it():
    tracking = {"user": "u", "metadata": {"k": "v"}, "prompt_cache_key": "k", "safety_identifier": "s",
                "service_tier": "auto", "prompt_cache_retention": "24h", "store": False}
    payload = responses.to_chat({"model": "m", "input": "Hi", **tracking})
    assert {k: payload[k] for k in tracking if k != "store"} == {k: v for k, v in tracking.items() if k != "store"}
    assert parse_request(ChatCompletionRequest, payload).ignored_fields() == sorted(set(tracking) - {"store"})


def test_text_input_and_instructions():
    payload = responses.to_chat({"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 9,
                                 "temperature": 0, "top_p": 0.5, "store": False, "stream": True})
    assert payload["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (payload["max_tokens"], payload["temperature"], payload["top_p"], payload["stream"]) == (9, 0, 0.5, True)


def test_items_with_function_calls_and_outputs_map_onto_chat_tools():
    payload = responses.to_chat({"model": "m", "tools": [TOOL], "tool_choice": {"type": "function", "name": "add"},
                                 "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
                                 "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "1+2 and 3+4?"}]},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a":1,"b":2}'},
        {"type": "function_call", "call_id": "c2", "name": "add", "arguments": '{"a":3,"b":4}'},
        {"type": "function_call_output", "call_id": "c1", "output": "3"},
        {"type": "function_call_output", "call_id": "c2", "output": "7"}]})
    assert payload["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"},
                                                                  "strict": True}}]
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert payload["response_format"] == {"type": "json_schema", "json_schema": {"name": "n",
                                                                                 "schema": {"type": "object"}}}
    user, assistant, out1, out2 = payload["messages"]
    assert user == {"role": "user", "content": "1+2 and 3+4?"}
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]  # parallel calls: one turn
    assert assistant["tool_calls"][1]["function"] == {"name": "add", "arguments": '{"a":3,"b":4}'}
    assert (out1, out2) == ({"role": "tool", "tool_call_id": "c1", "content": "3"},
                            {"role": "tool", "tool_call_id": "c2", "content": "7"})


@pytest.mark.parametrize("extra,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
    ({"reasoning": {"effort": "low"}}, "reasoning"), ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"truncation": "auto"}, "truncation"),
])
def test_unsupported_fields_are_refused_by_name(extra, param):
    with pytest.raises(InvalidRequest) as err:
        responses.to_chat({"model": "m", "input": "Hi", **extra})
    assert err.value.param == param


def test_reply_becomes_a_response_with_function_call_items():
    body = {"model": "m", "input": "x", "tools": [TOOL]}
    out = responses.from_reply(Reply("", [ToolCall("c1", "add", '{"a":1}')], "tool_calls", 5, 2), body, "m", "resp_1")
    assert out["object"] == "response" and out["status"] == "completed"
    (item,) = out["output"]
    assert (item["type"], item["call_id"], item["name"], item["arguments"]) == ("function_call", "c1", "add", '{"a":1}')
    assert out["usage"]["total_tokens"] == 7
    cut = responses.from_reply(Reply("abc", [], "length", 5, 2), {"model": "m", "input": "x"}, "m", "resp_2")
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["content"][0]["text"] == "abc"


def test_stream_events_in_order_with_sequence_numbers():
    s = responses.ResponseStream({"model": "m", "input": "x"}, "m", "resp_1")
    frames = []
    for chunk in [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "add",
                                                                                           "arguments": "{}"}}]}}]},
                  {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
                  {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}]:
        frames += s.feed(chunk)
    events = [json.loads(f.decode().split("data: ", 1)[1]) for f in frames + s.finish()]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["output"][1]["call_id"] == "c1"
    assert final["usage"]["output_tokens"] == 4
    assert events[9]["output_index"] == 1 and events[9]["item"]["type"] == "function_call"
