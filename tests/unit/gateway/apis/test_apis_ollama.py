"""Ollama /api/chat and /api/generate <-> chat/completions, on canned bodies and chunks."""

from __future__ import annotations

import json

import pytest

from dormant.errors import InvalidRequest
from dormant.gateway.apis import ollama
from dormant.gateway.apis.chat import Reply, ToolCall
from dormant.worker_api import Route


def test_options_map_onto_chat_fields_and_stream_defaults_to_true():
    payload, path = ollama.chat_to_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "format": "json",
                                         "options": {"temperature": 0.1, "top_p": 0.8, "top_k": 3, "min_p": 0.05,
                                                     "seed": 7, "num_predict": 12, "stop": ["x"],
                                                     "repeat_penalty": 1.1, "num_ctx": 4096}})
    assert path == Route.CHAT_COMPLETIONS and payload["stream"] is True
    assert {k: payload[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop",
                                    "repetition_penalty")} == {
        "temperature": 0.1, "top_p": 0.8, "top_k": 3, "min_p": 0.05, "seed": 7, "max_tokens": 12, "stop": ["x"],
        "repetition_penalty": 1.1}
    assert payload["response_format"] == {"type": "json_object"} and "num_ctx" not in payload
    unlimited, _ = ollama.chat_to_chat({"model": "m", "messages": [], "stream": False, "options": {"num_predict": -1}})
    assert "max_tokens" not in unlimited and unlimited["stream"] is False


@pytest.mark.parametrize("body,param", [
    ({"options": {"mirostat": 1}}, "options.mirostat"), ({"think": True}, "think"), ({"images": ["x"]}, "images"),
    ({"messages": [{"role": "user", "content": "x", "images": ["b64"]}]}, "messages[0].images"),
])
def test_what_is_not_acted_on_is_refused_by_name(body, param):
    with pytest.raises(InvalidRequest) as err:
        ollama.chat_to_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert err.value.param == param


def test_tool_calls_get_ids_and_tool_messages_answer_them_by_name():
    payload, _ = ollama.chat_to_chat({"model": "m", "tools": [{"type": "function", "function": {
        "name": "add", "parameters": {"type": "object"}}}], "messages": [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "add", "arguments": {"a": 1}}}, {"function": {"name": "mul", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "6", "tool_name": "mul"}, {"role": "tool", "content": "3", "tool_name": "add"}]})
    assert payload["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    calls = payload["messages"][1]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "add", '{"a": 1}'), ("call_1", "mul", '{"a": 2}')]
    assert [m["tool_call_id"] for m in payload["messages"][2:]] == ["call_1", "call_0"]


def test_generate_uses_the_template_unless_raw():
    payload, path = ollama.generate_to_chat({"model": "m", "prompt": "Hi", "system": "Be brief.", "suffix": ""})
    assert path == Route.CHAT_COMPLETIONS
    assert payload["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    raw, path = ollama.generate_to_chat({"model": "m", "prompt": "Once upon", "raw": True})
    assert path == Route.COMPLETIONS and raw["prompt"] == "Once upon"
    assert ollama.is_load_only({"model": "m", "prompt": ""}, chat=False)
    assert ollama.is_load_only({"model": "m", "messages": []}, chat=True)


def test_reply_in_ollamas_shape():
    body = ollama.reply_body(Reply("", [ToolCall("c", "add", '{"a": 1}')], "tool_calls", 4, 2), "m", True, 0.0)
    assert body["message"] == {"role": "assistant", "content": "",
                               "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]}
    assert (body["done"], body["done_reason"], body["prompt_eval_count"], body["eval_count"]) == (True, "stop", 4, 2)
    generated = ollama.reply_body(Reply("text", [], "length", 4, 2), "m", False, 0.0)
    assert generated["response"] == "text" and generated["done_reason"] == "length"


def test_stream_is_ndjson_with_tool_calls_whole_and_a_done_line():
    s = ollama.OllamaStream("m", chat=True, started=0.0)
    assert s.held() == []
    lines = []
    for chunk in [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": "Hi"}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "add",
                                                                                          "arguments": '{"a"'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
                  {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
                  {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}]:
        lines += s.feed(chunk)
    parsed = [json.loads(line) for line in lines + s.finish()]
    assert all(line.endswith(b"\n") for line in lines)
    assert [p["message"]["content"] for p in parsed] == ["Hi", "", ""]
    assert parsed[1]["message"]["tool_calls"] == [{"function": {"name": "add", "arguments": {"a": 1}}}]
    assert parsed[-1]["done"] is True and parsed[-1]["eval_count"] == 3 and parsed[-1]["prompt_eval_count"] == 5
    raw = ollama.OllamaStream("m", chat=False, started=0.0, raw=True)
    text = raw.feed({"choices": [{"text": "upon", "finish_reason": None}]})
    assert json.loads(text[0])["response"] == "upon"
