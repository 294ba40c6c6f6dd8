"""OpenAI's Responses API (POST /v1/responses), stateless, as chat/completions.

    to_chat(body)          the chat payload; a 400 names each field not acted on, among them
                           what needs stored state (previous_response_id, store: true,
                           background, conversation)
    from_reply(...)        a chat answer as a Response object
    ResponseStream         chat chunks as the Responses event sequence: response.created,
                           response.in_progress, then per output item output_item.added,
                           content_part.added, output_text.delta... (function_call_arguments
                           .delta... for a tool call), the .done events, response.completed

`input` is a string or a list of items: messages (input_text / output_text parts),
function_call and function_call_output, which become assistant `tool_calls` and `tool`
messages. `instructions` is a system message first.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from dormant.errors import DormantError, InvalidRequest
from dormant.gateway.apis.chat import Reply, function_tool, read_delta, refuse_unknown, text_of, tool_call
from dormant.protocol import ChatCompletionRequest

# what the spec lets a server leave aside (user, metadata, prompt_cache_key...): handed on to
# chat/completions, which logs them at debug (protocol.py); `store` is decided here
_TRACKING = tuple(sorted(ChatCompletionRequest.SPEC_IGNORED - {"store"}))
_FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
           "parallel_tool_calls", "stream", "store", "text", "truncation", "keep_alive", *_TRACKING}
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("store") is True:
        raise InvalidRequest("'store': dormant's Responses API is stateless; send store: false (or leave it out).",
                             param="store")
    refuse_unknown(body, _FIELDS)
    if body.get("truncation") not in (None, "disabled"):
        raise InvalidRequest("'truncation': only 'disabled' is supported.", param="truncation")
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": text_of(body["instructions"], "instructions")})
    messages += _input_messages(body.get("input"))
    payload: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        payload["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "stream", "parallel_tool_calls", *_TRACKING):
        if body.get(name) is not None:
            payload[name] = body[name]
    if body.get("tools"):
        payload["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        payload["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _text_format(body.get("text"))
    if response_format:
        payload["response_format"] = response_format
    return payload


def _input_messages(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("'input' is required: a string or a non-empty list of items.", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            refuse_unknown(item, {"type", "role", "content", "id", "status"}, f"{where}.")
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"'{where}.role' must be user, assistant, system or developer.",
                                     param=f"{where}.role")
            out.append({"role": role, "content": text_of(item.get("content"), f"{where}.content", _TEXT_PARTS)})
        elif kind == "function_call":
            refuse_unknown(item, {"type", "call_id", "name", "arguments", "id", "status"}, f"{where}.")
            call = tool_call(item.get("call_id") or "", item.get("name") or "", item.get("arguments") or "{}")
            if out and out[-1]["role"] == "assistant" and not out[-1].get("content") and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            refuse_unknown(item, {"type", "call_id", "output", "id", "status"}, f"{where}.")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": text_of(item.get("output"), f"{where}.output", _TEXT_PARTS)})
        else:
            raise InvalidRequest(f"'{where}': input items of type {kind!r} are not supported; message, "
                                 "function_call and function_call_output are.", param=f"{where}.type")
    return out


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise InvalidRequest(f"'{param}.type': tools of type {kind!r} are not supported; only function tools are.",
                             param=f"{param}.type")
    refuse_unknown(tool, {"type", "name", "description", "parameters", "strict"}, f"{param}.")
    out = function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"), param)
    if tool.get("strict") is not None:
        out["function"]["strict"] = tool["strict"]
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("'tool_choice' must be auto, none, required or {type: function, name}.", param="tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(text, dict):
        refuse_unknown(text, {"format"}, "text.")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest("'text.format.type' must be text, json_object or json_schema.", param="text.format.type")


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_object(body: dict[str, Any], model: str, response_id: str, created_at: int, *, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The Response object; the request's settings echoed as the API does."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None, "reasoning": None, "store": False,
        "temperature": body.get("temperature", 1.0), "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": [_echoed_tool(t) for t in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled", "metadata": body.get("metadata") or {},
    } | ({"usage": usage} if usage is not None else {}) | ({"user": body["user"]} if body.get("user") else {})


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as a Response lists it: every field the spec requires present."""
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def from_reply(reply: Reply, body: dict[str, Any], model: str, response_id: str) -> dict[str, Any]:
    has_text = reply.text or not reply.tool_calls
    output = [_message_item(f"msg_{uuid.uuid4().hex}", reply.text, "completed")] if has_text else []
    output += [_call_item(f"fc_{uuid.uuid4().hex}", c.id, c.name, c.arguments, "completed") for c in reply.tool_calls]
    status = "incomplete" if reply.finish_reason == "length" else "completed"
    return response_object(body, model, response_id, int(time.time()), status=status, output=output,
                           usage=_usage(reply.prompt_tokens, reply.completion_tokens))


class ResponseStream:
    """Chat chunks -> Responses streaming events, each with its sequence_number."""

    media_type = "text/event-stream"

    def __init__(self, body: dict[str, Any], model: str, response_id: str) -> None:
        self._body, self._model, self._id = body, model, response_id
        self._created = int(time.time())
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # finished items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._open_index: int | None = None  # its chat tool call index (None: the message)
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._started = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def _response(self, status: str) -> dict[str, Any]:
        output = self._output if status != "in_progress" else []
        return response_object(self._body, self._model, self._id, self._created, status=status, output=output,
                               usage=self._usage if status != "in_progress" else None)

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _open_item(self, item: dict[str, Any], index: int | None) -> list[bytes]:
        out = self._close_item()
        self._open, self._open_index = item, index
        n = len(self._output)
        public = _message_item(item["id"], "", "in_progress") if item["type"] == "message" else dict(item)
        out.append(self._event("response.output_item.added", output_index=n, item=public))
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=n,
                                   content_index=0, part=_text_part("")))
        return out

    def _close_item(self) -> list[bytes]:
        item, n = self._open, len(self._output)
        if item is None:
            return []
        self._open = None
        if item["type"] == "message":
            part = _text_part(item["text"])
            done = _message_item(item["id"], item["text"], "completed")
            out = [self._event("response.output_text.done", item_id=item["id"], output_index=n, content_index=0,
                               text=item["text"], logprobs=[]),
                   self._event("response.content_part.done", item_id=item["id"], output_index=n,
                               content_index=0, part=part)]
        else:
            done = dict(item, status="completed")
            out = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=n,
                               name=item["name"], arguments=item["arguments"])]
        self._output.append(done)
        return out + [self._event("response.output_item.done", output_index=n, item=done)]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        d = read_delta(chunk)
        out = self._start()
        if d.text:
            if self._open is None or self._open["type"] != "message":
                out += self._open_item({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                                        "role": "assistant", "text": ""}, None)
            self._open["text"] += d.text
            out.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                   output_index=len(self._output), content_index=0, delta=d.text, logprobs=[]))
        for call in d.tool_calls:
            if self._open is None or self._open_index != call.index or self._open["type"] != "function_call":
                out += self._open_item(_call_item(f"fc_{uuid.uuid4().hex}", call.id or "", call.name or "", "",
                                                  "in_progress"), call.index)
            if call.arguments:
                self._open["arguments"] += call.arguments
                out.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                       output_index=len(self._output), delta=call.arguments))
        self._finish = d.finish_reason or self._finish
        if d.usage:
            self._usage = _usage(d.usage.get("prompt_tokens", 0), d.usage.get("completion_tokens", 0))
        return out

    def held(self) -> list[bytes]:
        return [b": loading\n\n"]  # an SSE comment: the SDK skips it

    def error(self, exc: DormantError) -> list[bytes]:
        return self._start() + [self._event("error", code=exc.code, message=exc.message, param=exc.param)]

    def finish(self) -> list[bytes]:
        out = self._start() + self._close_item()
        if self._finish == "length":
            return out + [self._event("response.incomplete", response=self._response("incomplete"))]
        return out + [self._event("response.completed", response=self._response("completed"))]
