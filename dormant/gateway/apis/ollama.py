"""Ollama's /api/chat and /api/generate as chat/completions (or /v1/completions for `raw`).

    chat_to_chat(body) / generate_to_chat(body)   (the chat payload, the worker route)
    chat_reply / generate_reply                   a whole answer in Ollama's shape
    OllamaStream                                  chat chunks as NDJSON lines, the last one
                                                  `done: true` with the counts

`stream` defaults to true, as in Ollama. `options` map onto the chat fields by name
(_OPTIONS); options that tell Ollama how to load a model on its own hardware (_LOAD_HINTS:
num_ctx, num_gpu, num_thread...) are for dormant's configuration to decide, so they are
accepted and logged; any other option is refused by name. Ollama tool calls carry no ids: ids
are made up in order, and a `tool` message answers the earliest open call of its
`tool_name` (else the earliest open one).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from dormant.errors import DormantError, InvalidRequest
from dormant.gateway.apis.chat import Reply, arguments_object, function_tool, read_delta, refuse_unknown, tool_call
from dormant.worker_api import Route

log = logging.getLogger("dormant.gateway")

# Ollama option -> chat/completions field (vLLM's names for the extensions)
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repeat_penalty": "repetition_penalty", "num_predict": "max_tokens"}
_LOAD_HINTS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
               "low_vram"}
_COMMON = {"model", "format", "options", "stream", "keep_alive", "think"}
_CHAT_FIELDS = _COMMON | {"messages", "tools"}
_GENERATE_FIELDS = _COMMON | {"prompt", "suffix", "system", "template", "context", "raw", "images"}


def _common(body: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    payload["model"] = body.get("model")
    payload["stream"] = body.get("stream", True) is not False
    if body.get("think"):
        raise InvalidRequest("'think': thinking output is not supported here.", param="think")
    fmt = body.get("format")
    if fmt == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequest("'format' must be \"json\" or a JSON schema.", param="format")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object.", param="options")
    refuse_unknown(options, set(_OPTIONS) | _LOAD_HINTS, "options.")
    for name, value in options.items():
        if value is None:
            continue
        if name in _LOAD_HINTS:
            log.debug("options.%s=%r: the model's configuration decides this", name, value)
        elif name == "num_predict":
            if value > 0:  # -1: until done, -2: until the context is full; both are the default here
                payload["max_tokens"] = value
        else:
            payload[_OPTIONS[name]] = value
    return payload


def chat_to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    refuse_unknown(body, _CHAT_FIELDS)
    messages, open_calls, next_id = [], [], 0
    for i, m in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        refuse_unknown({k: v for k, v in m.items() if v not in (None, [], "")},
                       {"role", "content", "tool_calls", "tool_name"}, f"{where}.")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"'{where}.role' must be system, user, assistant or tool.", param=f"{where}.role")
        out: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = (call or {}).get("function") or {}
                call_id, next_id = f"call_{next_id}", next_id + 1
                calls.append(tool_call(call_id, fn.get("name") or "", fn.get("arguments")))
                open_calls.append((call_id, fn.get("name")))
            out["tool_calls"] = calls
        if role == "tool":
            match = next((c for c in open_calls if c[1] == m.get("tool_name")), open_calls[0] if open_calls else None)
            if match is None:
                raise InvalidRequest(f"'{where}': a tool message answers no earlier tool call.", param=where)
            open_calls.remove(match)
            out["tool_call_id"] = match[0]
        messages.append(out)
    payload = _common(body, {"messages": messages})
    if body.get("tools"):
        payload["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(body["tools"])]
    return payload, Route.CHAT_COMPLETIONS


def _tool(tool: Any, param: str) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest(f"'{param}' must be a function tool.", param=param)
    return function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), param)


def generate_to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`raw` sends the prompt as it is (/v1/completions); else system + prompt through the chat
    template, as Ollama applies the model's template."""
    refuse_unknown(body, _GENERATE_FIELDS)
    for name in ("suffix", "template", "context", "images"):
        if body.get(name):
            raise InvalidRequest(f"'{name}' is not supported.", param=name)
    prompt = body.get("prompt") or ""
    if body.get("raw"):
        if body.get("system"):
            raise InvalidRequest("'system' has no place in a raw prompt.", param="system")
        return _common(body, {"prompt": prompt}), Route.COMPLETIONS
    messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    messages.append({"role": "user", "content": prompt})
    return _common(body, {"messages": messages}), Route.CHAT_COMPLETIONS


def is_load_only(body: dict[str, Any], chat: bool) -> bool:
    """Ollama loads (or, with keep_alive 0, unloads) a model for a request with nothing to say."""
    return not body.get("messages") if chat else not body.get("prompt")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _done_fields(reason: str | None, prompt_tokens: int, completion_tokens: int, started: float) -> dict[str, Any]:
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": int((time.monotonic() - started) * 1e9), "prompt_eval_count": prompt_tokens,
            "eval_count": completion_tokens}


def _ollama_calls(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"function": {"name": name, "arguments": arguments_object(args)}} for name, args in calls]


def reply_body(reply: Reply, model: str, chat: bool, started: float) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        out["message"] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            out["message"]["tool_calls"] = _ollama_calls([(c.name, c.arguments) for c in reply.tool_calls])
    else:
        out["response"] = reply.text
    return out | _done_fields(reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, started)


def completion_reply(body: dict[str, Any]) -> Reply:
    """A /v1/completions answer (raw generate) as a Reply."""
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    return Reply(text=choice.get("text") or "", tool_calls=[], finish_reason=choice.get("finish_reason"),
                 prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))


class OllamaStream:
    """Chat (or completion) chunks -> NDJSON lines. Tool calls go out whole, in one line before
    the last (Ollama's clients read a call once, complete)."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, chat: bool, started: float, raw: bool = False) -> None:
        """`chat`: /api/chat's lines (else /api/generate's); `raw`: fed /v1/completions chunks."""
        self.model, self.chat, self.started, self.raw = model, chat, started, raw
        self._calls: dict[int, list[str]] = {}  # chat index -> [name, arguments]
        self._reason: str | None = None
        self._usage: dict[str, int] = {}

    def _line(self, text: str, **extra: Any) -> bytes:
        out: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return (json.dumps(out | extra, separators=(",", ":")) + "\n").encode()

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        d = read_delta(chunk)
        if self.raw:  # a completion chunk: choices[].text
            for choice in chunk.get("choices") or []:
                d.text += choice.get("text") or ""
                d.finish_reason = choice.get("finish_reason") or d.finish_reason
        for call in d.tool_calls:
            entry = self._calls.setdefault(call.index, ["", ""])
            entry[0] = call.name or entry[0]
            entry[1] += call.arguments
        self._reason = d.finish_reason or self._reason
        self._usage = d.usage or self._usage
        return [self._line(d.text, done=False)] if d.text else []

    def held(self) -> list[bytes]:
        return []  # NDJSON has no comment line: the client just waits

    def error(self, exc: DormantError) -> list[bytes]:
        return [(json.dumps({"error": exc.message}) + "\n").encode()]

    def finish(self) -> list[bytes]:
        out = []
        if self._calls:
            calls = _ollama_calls([tuple(self._calls[i]) for i in sorted(self._calls)])
            line = json.loads(self._line(""))
            line["message"]["tool_calls"] = calls
            out.append((json.dumps(line | {"done": False}, separators=(",", ":")) + "\n").encode())
        done = _done_fields(self._reason, self._usage.get("prompt_tokens", 0),
                            self._usage.get("completion_tokens", 0), self.started)
        return out + [self._line("", **done)]
