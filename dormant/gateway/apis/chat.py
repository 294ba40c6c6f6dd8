"""The chat/completions side every translator speaks: what a chat answer says (`Reply`), what a
streamed chunk says (`Delta`), and the tool fields (`function_tool`, `tool_call`).

The worker serves only /v1/chat/completions and /v1/completions; the Responses, Anthropic and
Ollama APIs are rewritten into those and their answers read back through the helpers here, so
each translator sees one small vocabulary instead of the chunk format. Pure data, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dormant.errors import InvalidRequest


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as chat/completions carries it


@dataclass
class Reply:
    """A whole chat answer, read from a chat.completion body."""

    text: str
    tool_calls: list[ToolCall]
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended it (chat's vLLM-style stop_reason)


@dataclass
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class Delta:
    """One streamed chat chunk: text, tool-call fragments, the finish reason, the usage."""

    text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stop_sequence: str | None = None


def read_reply(body: dict[str, Any]) -> Reply:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [ToolCall(id=c.get("id") or "", name=(c.get("function") or {}).get("name") or "",
                      arguments=(c.get("function") or {}).get("arguments") or "{}")
             for c in message.get("tool_calls") or []]
    usage = body.get("usage") or {}
    return Reply(text=message.get("content") or "", tool_calls=calls, finish_reason=choice.get("finish_reason"),
                 prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                 stop_sequence=_stop_string(choice))


def _stop_string(choice: dict[str, Any]) -> str | None:
    reason = choice.get("stop_reason")
    return reason if isinstance(reason, str) else None  # vLLM gives a stop token's id as an int


def read_delta(chunk: dict[str, Any]) -> Delta:
    delta = Delta(usage=chunk.get("usage") or None)
    for choice in chunk.get("choices") or []:
        d = choice.get("delta") or {}
        delta.text += d.get("content") or ""
        for c in d.get("tool_calls") or []:
            fn = c.get("function") or {}
            delta.tool_calls.append(ToolCallDelta(index=c.get("index", 0), id=c.get("id"), name=fn.get("name"),
                                                  arguments=fn.get("arguments") or ""))
        delta.finish_reason = choice.get("finish_reason") or delta.finish_reason
        delta.stop_sequence = _stop_string(choice) or delta.stop_sequence
    return delta


def function_tool(name: Any, description: Any, parameters: Any, param: str) -> dict[str, Any]:
    """A chat `tools` entry; `param` names the client's field in a refusal."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"'{param}.name' is required: a function name.", param=f"{param}.name")
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"'{param}' must give its parameters as a JSON schema object.", param=param)
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """An assistant message's `tool_calls` entry; `arguments` an object or its JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def arguments_object(text: str) -> Any:
    """A tool call's arguments as JSON, for the APIs that carry an object (Anthropic, Ollama);
    text that is not JSON stays text rather than being lost."""
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def refuse_unknown(body: dict[str, Any], known: set[str], where: str = "") -> None:
    """A 400 naming the fields this translation does not act on (issue 11: nothing is silently
    ignored)."""
    unknown = sorted(set(body) - known)
    if unknown:
        names = ", ".join(f"'{where}{k}'" for k in unknown)
        raise InvalidRequest(f"Unsupported field(s) {names}: dormant does not act on them, so it refuses them "
                             "rather than ignoring them.", param=f"{where}{unknown[0]}")


def text_of(content: Any, param: str, text_types: tuple[str, ...] = ("text",)) -> str:
    """The text of a `content` that is a string or a list of text parts; any other part is
    refused by name."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or a list of content parts.", param=param)
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_types or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"'{param}[{j}]': content of type {kind!r} is not supported; only "
                                 f"{' and '.join(text_types)} parts are.", param=f"{param}[{j}].type")
        pieces.append(part["text"])
    return "".join(pieces)
