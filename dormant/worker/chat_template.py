"""The chat request through the model's own chat template: messages (tool calls and tool
results included), `tools` and `chat_template_kwargs`, as `apply_chat_template` takes them.

A template that never mentions `tools` cannot show them to the model (SmolLM2's): `tools` is
refused with a 400 rather than dropped. With `tool_choice: "none"` the tools are not shown,
so the model answers in text (OpenAI: "the model will not call any tool"). Which tool-call and
reasoning parser a reply gets is decided here too (`ModelFormats`): the configured name, else
the one the template's markers point to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest, ChatMessage
from dormant.worker.reasoning import detect_reasoning_parser
from dormant.worker.tool_parsers import detect_tool_parser

# apply_chat_template's own arguments: a template variable of these names would change how the
# prompt is built, not what the template shows
_RESERVED_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else "\n".join(map(str, template.values()))


@dataclass(frozen=True)
class ModelFormats:
    """The parsers a model's replies go through: configured, else detected from its template."""

    supports_tools: bool
    tool_call_parser: str | None
    reasoning_parser: str | None

    @classmethod
    def of(cls, tokenizer, tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> ModelFormats:
        text = template_text(tokenizer)
        return cls(supports_tools="tools" in text,
                   tool_call_parser=tool_call_parser or detect_tool_parser(text),
                   reasoning_parser=reasoning_parser or detect_reasoning_parser(text))


def uses_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def render_chat(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """The messages (and tools) through the model's chat template, ready for the assistant's turn."""
    if uses_tools(req) and "tools" not in template_text(tokenizer):
        raise InvalidRequest("This model's chat template does not support tools: it cannot show them to the model.",
                             param="tools")
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidRequest(f"'chat_template_kwargs' may not set {', '.join(reserved)}: the request's own fields do.",
                             param="chat_template_kwargs")
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if uses_tools(req) else None
    try:
        prompt_ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                   tokenize=True, **kwargs)
    except Exception as exc:  # the model's own Jinja template refused these messages
        raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from None
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    return list(prompt_ids)


def _message(m: ChatMessage, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name,
                          "arguments": _arguments(c.function.arguments, f"messages[{index}].tool_calls[{j}]")}}
            for j, c in enumerate(m.tool_calls)
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    return out


def _arguments(text: str, where: str) -> Any:
    """The spec sends arguments as JSON text; templates (HF's convention) expect the object."""
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequest(f"'{where}.function.arguments' is not valid JSON.",
                             param=f"{where}.function.arguments") from None
