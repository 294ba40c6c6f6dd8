"""The grammar that forces tool calls (`tool_choice` "required" or a named function): the
sampler masks every token that would leave it, so each call is well formed in the model's
own format and its arguments are valid JSON for the tool's `parameters`.

The grammar is llguidance's Lark syntax (engines/base.py's Guidance kind "grammar"), one rule
per tool; JSON parts are `%json{schema}`, so the schema's own checks (types, required keys,
enums) hold while the model writes. A named function, or `parallel_tool_calls: false`, allows
exactly one call; "required" one or more. After the last call the grammar is complete and only
the end of the reply may follow.
"""

from __future__ import annotations

import json
from typing import Any

from dormant.engines.base import Guidance
from dormant.protocol import ChatTool

# how each format writes one call, and what separates parallel calls (as their templates show
# them), around a JSON object or the XML body
_JSON_CALL = {
    "hermes": ('"<tool_call>\\n" ', ' "\\n</tool_call>"', '"\\n"', "arguments"),
    "llama3_json": ("", "", '"; "', "parameters"),
    "mistral": ("", "", '", "', "arguments"),
}
# A Qwen3-Coder string value with its closing tag, as one lexeme: text without "</" in it. A
# value lexeme apart from its tag would swallow the newline before it (lexemes are greedy).
_XML_TEXT_AND_CLOSE = r"/([^<]|<[^\/])*\n<\/parameter>\n/"


def tool_call_grammar(parser: str, tools: list[ChatTool], one_call: bool, name: str | None = None) -> Guidance:
    """Guidance for calls in `parser`'s format to `tools` (only `name`, where given)."""
    chosen = [t for t in tools if name is None or t.function.name == name]
    lines = []
    for i, tool in enumerate(chosen):
        body = _xml_call(tool) if parser == "qwen3_coder" else _json_call(parser, tool)
        lines.append(f"call_{i}: {body}")
    calls = " | ".join(f"call_{i}" for i in range(len(chosen)))
    sep = '"\\n"' if parser == "qwen3_coder" else _JSON_CALL[parser][2]
    many = "" if one_call else f" ({sep} call)*"
    top = f'start: "[" call{many} "]"' if parser == "mistral" else f"start: call{many}"
    return Guidance(kind="grammar", value="\n".join([top, f"call: {calls}", *lines]))


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _json_call(parser: str, tool: ChatTool) -> str:
    before, after, _, args_key = _JSON_CALL[parser]
    schema = {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, args_key: _parameters(tool)},
        "required": ["name", args_key],
        "additionalProperties": False,
    }
    return f"{before}%json {json.dumps(schema)}{after}"


def _xml_call(tool: ChatTool) -> str:
    """Qwen3-Coder: each parameter in the schema's order, the required ones always there."""
    params = _parameters(tool)
    required = set(params.get("required", ()))
    parts = []
    for key, schema in (params.get("properties") or {}).items():
        if schema.get("type") == "string":
            value = _XML_TEXT_AND_CLOSE
        else:
            value = f'%json {json.dumps(schema)} "\\n</parameter>\\n"'
        part = f'("<parameter={key}>\\n" {value})'
        parts.append(part if key in required else part + "?")
    inner = " ".join(parts)
    return f'"<tool_call>\\n<function={tool.function.name}>\\n" {inner} "</function>\\n</tool_call>"'
