"""Anthropic's Messages API (POST /v1/messages) as chat/completions.

    to_chat(body)              the chat payload; a 400 names each field or block not acted on
    from_reply(reply, ...)     a chat answer as a Message
    MessageStream              chat chunks as Anthropic's SSE: message_start, then per content
                               block content_block_start / _delta... / _stop, then
                               message_delta (stop_reason, usage) and message_stop

Blocks map onto chat fields: text -> content; an assistant's tool_use -> `tool_calls`; a user's
tool_result -> a `tool` message with its tool_call_id, placed before that turn's text (the
order the results answer the calls in). `metadata.user_id` is the only field accepted and not
acted on (the API defines it as an opaque id for abuse tracking).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from dormant.errors import DormantError, InvalidRequest
from dormant.gateway.apis.chat import (
    Reply,
    arguments_object,
    function_tool,
    read_delta,
    refuse_unknown,
    text_of,
    tool_call,
)
from dormant.gateway.apis.errors import anthropic_error_body

log = logging.getLogger("dormant.gateway")

_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
           "stream", "tools", "tool_choice", "metadata", "keep_alive"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    refuse_unknown(body, _FIELDS)
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise InvalidRequest("'max_tokens' is required: an integer.", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required: a non-empty list.", param="messages")
    chat: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        chat += _messages(message, f"messages[{i}]")
    payload: dict[str, Any] = {"model": body.get("model"), "messages": chat, "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k", "stream"):
        if body.get(name) is not None:
            payload[name] = body[name]
    if body.get("stop_sequences"):
        payload["stop"] = body["stop_sequences"]
    if body.get("tools"):
        payload["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        payload.update(_tool_choice(body["tool_choice"]))
    metadata = body.get("metadata")
    if metadata:
        if not isinstance(metadata, dict):
            raise InvalidRequest("'metadata' must be an object.", param="metadata")
        refuse_unknown(metadata, {"user_id"}, "metadata.")
        log.debug("metadata.user_id %r is not acted on", metadata.get("user_id"))
    return payload


def _messages(message: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise InvalidRequest(f"'{param}.role' must be user or assistant.", param=f"{param}.role")
    refuse_unknown(message, {"role", "content"}, f"{param}.")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}.content' must be a string or a list of blocks.", param=f"{param}.content")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            refuse_unknown(block, {"type", "text", "cache_control"}, f"{where}.")
            texts.append(text_of([block], where))
        elif kind == "tool_use" and role == "assistant":
            refuse_unknown(block, {"type", "id", "name", "input", "cache_control"}, f"{where}.")
            calls.append(tool_call(block.get("id") or f"toolu_{uuid.uuid4().hex[:24]}", block.get("name") or "",
                                   block.get("input")))
        elif kind == "tool_result" and role == "user":
            refuse_unknown(block, {"type", "tool_use_id", "content", "is_error", "cache_control"}, f"{where}.")
            text = text_of(block.get("content"), f"{where}.content")
            if block.get("is_error"):  # the chat side has no flag for it: the model reads it instead
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            raise InvalidRequest(f"'{where}': a block of type {kind!r} is not supported in a {role} message; "
                                 "text, tool_use (assistant) and tool_result (user) are.", param=f"{where}.type")
    if role == "assistant":
        out = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return results + ([{"role": "user", "content": "".join(texts)}] if texts or not results else [])


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param)
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(f"'{param}.type': server tools ({tool.get('type')!r}) are not supported; "
                             "only client tools (name, description, input_schema) are.", param=f"{param}.type")
    refuse_unknown(tool, {"type", "name", "description", "input_schema", "cache_control"}, f"{param}.")
    return function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), param)


def _tool_choice(choice: Any) -> dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    known = {"auto": "auto", "any": "required", "none": "none"}
    if kind in known:
        out: dict[str, Any] = {"tool_choice": known[kind]}
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    else:
        raise InvalidRequest("'tool_choice.type' must be auto, any, tool (with a name) or none.",
                             param="tool_choice.type")
    refuse_unknown(choice, {"type", "name", "disable_parallel_tool_use"}, "tool_choice.")
    if choice.get("disable_parallel_tool_use") is not None:
        out["parallel_tool_calls"] = not choice["disable_parallel_tool_use"]
    return out


def from_reply(reply: Reply, model: str, message_id: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text or not reply.tool_calls else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(c.arguments)}
                for c in reply.tool_calls]
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _stop_reason(reply.finish_reason, reply.stop_sequence), "stop_sequence": reply.stop_sequence,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}}


def _stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if stop_sequence is not None and finish_reason == "stop":
        return "stop_sequence"  # one of the request's stop_sequences (the chat's only stop strings)
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class MessageStream:
    """Chat chunks -> Anthropic's stream. A block opens at its first delta: text, then one
    tool_use block per chat tool call (its arguments streamed as input_json_delta)."""

    media_type = "text/event-stream"

    def __init__(self, model: str, message_id: str) -> None:
        self.model, self.message_id = model, message_id
        self._started = False
        self._block: tuple[str, int] | None = None  # ("text", 0) or ("tool", chat index)
        self._index = -1  # the Anthropic content block index
        self._stop_reason = "end_turn"
        self._stop_sequence: str | None = None
        self._usage = {"input_tokens": 0, "output_tokens": 0}

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": dict(self._usage)}
        return [_sse("message_start", {"type": "message_start", "message": message})]

    def _open(self, block: tuple[str, int], start: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._block, self._index = block, self._index + 1
        return out + [_sse("content_block_start", {"type": "content_block_start", "index": self._index,
                                                   "content_block": start})]

    def _close(self) -> list[bytes]:
        if self._block is None:
            return []
        self._block = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        d = read_delta(chunk)
        out = self._start()
        if d.text:
            if self._block != ("text", 0):
                out += self._open(("text", 0), {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": d.text}))
        for call in d.tool_calls:
            if self._block != ("tool", call.index):
                out += self._open(("tool", call.index), {"type": "tool_use", "name": call.name or "", "input": {},
                                                         "id": call.id or f"toolu_{uuid.uuid4().hex[:24]}"})
            if call.arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        if d.finish_reason:
            self._stop_reason, self._stop_sequence = _stop_reason(d.finish_reason, d.stop_sequence), d.stop_sequence
        if d.usage:
            self._usage = {"input_tokens": d.usage.get("prompt_tokens", 0),
                           "output_tokens": d.usage.get("completion_tokens", 0)}
        return out

    def held(self) -> list[bytes]:
        return [_sse("ping", {"type": "ping"})]

    def error(self, exc: DormantError) -> list[bytes]:
        return [_sse("error", anthropic_error_body(exc))]

    def finish(self) -> list[bytes]:
        out = self._start() + self._close()
        out.append(_sse("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": self._stop_reason,
                                                    "stop_sequence": self._stop_sequence},
                                          "usage": self._usage}))
        return out + [_sse("message_stop", {"type": "message_stop"})]
