"""The grammar that forces tool calls (`tool_choice` "required" or a named function): the
sampler masks every token that would leave it, so each call is well formed in the model's
own format and its arguments are valid JSON for the tool's `parameters`.

The grammar is llguidance's Lark syntax (engines/base.py's Guidance kind "grammar"), one rule
per tool; JSON parts are `%json{schema}`, so the schema's own checks (types, required keys,
enums) hold while the model writes. A named function, or `parallel_tool_calls: false`, allows
exactly one call; "required" one or more. After the last call the grammar is complete and only
the end of the reply may follow.

`tool_choice` "auto" with a tool marked `strict` (auto_tool_call_grammar): the reply stays free
text until the model writes the format's opening tag; from there the call must be well formed
for one of the tools, then text is free again. The formats without a tag (llama3_json, mistral)
call with the whole reply, as their parsers read it: a reply that opens with `{` (or `[`) is
the calls, held to the schemas; any other is free text.
"""

from __future__ import annotations

import json
import re
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


# the formats whose calls open with a tag that plain text would not write
_OPENING_TAG = {"hermes": "<tool_call>", "qwen3_coder": "<tool_call>"}
# the others: a reply that opens with this is the calls (tool_parsers/llama3.py, mistral.py)
_OPENING_REPLY = {"llama3_json": "{", "mistral": "["}


def auto_tool_call_grammar(parser: str, tools: list[ChatTool], one_call: bool) -> Guidance:
    """Guidance for `tool_choice` "auto" where a tool is `strict`: text, and calls that keep
    to the tools' schemas (one at most with `one_call`)."""
    tag = _OPENING_TAG.get(parser)
    if tag is None:  # the whole reply: the forced grammar, or text that does not open like it
        calls = tool_call_grammar(parser, tools, one_call).value.replace("start:", "calls:", 1)
        return Guidance(kind="grammar", value="\n".join([
            "start: calls | TEXT?", f"TEXT: /[^{re.escape(_OPENING_REPLY[parser])}](.|\\n)*/", calls]))
    opening = json.dumps(tag)[:-1]  # how a call's literal starts: '"<tool_call>'
    lines = []
    for i, tool in enumerate(tools):
        body = _xml_call(tool) if parser == "qwen3_coder" else _json_call(parser, tool)
        lines.append(f'call_{i}: "{body.removeprefix(opening)}')  # after the tag `opened` ends with
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    text = "(.|\\n)*"
    return Guidance(kind="grammar", value="\n".join([
        "%llguidance {}",
        f"start: (opened call){'?' if one_call else '*'} TEXT",
        # the text before a call, up to its tag: lazy, so it ends at the tag's first byte
        # sequence (a greedy lexeme would run on through the tag, and the call never start)
        f"opened[lazy]: TEXT {json.dumps(tag)}",
        # any text without the tag in it (llguidance's regex intersection and negation): text
        # after the last call cannot hold another one
        f"TEXT: /{text}/ & ~/{text}{re.escape(tag)}{text}/",
        f"call: {calls}", *lines]))


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
