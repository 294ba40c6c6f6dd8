"""Qwen3-Coder's XML tool calls:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are bare text; each becomes the JSON type its tool's schema gives it (a
string stays a string; a number, boolean, object or array is read as JSON, and left a string
where it does not read).
"""

from __future__ import annotations

import json
import re
from typing import Any

from dormant.protocol import FunctionCall
from dormant.worker.tool_parsers.base import ToolParser

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


class Qwen3CoderToolParser(ToolParser):
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def parse_region(self, region: str) -> list[FunctionCall] | None:
        body = region.removeprefix("<tool_call>").removesuffix("</tool_call>")
        functions = list(_FUNCTION.finditer(body))
        if not functions or _FUNCTION.sub("", body).strip():
            return None
        calls = []
        for function in functions:
            name = function.group(1).strip()
            props = self.schemas.get(name, {}).get("properties", {})
            args = {}
            for param in _PARAMETER.finditer(function.group(2)):
                key = param.group(1).strip()
                args[key] = _typed(_strip_newline(param.group(2)), props.get(key, {}))
            calls.append(FunctionCall(name=name, arguments=json.dumps(args, ensure_ascii=False)))
        return calls


def _strip_newline(value: str) -> str:
    """The template writes one newline either side of a value; only those are not the value's."""
    return value.removeprefix("\n").removesuffix("\n")


def _typed(value: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "string" or (kind is None and "enum" not in schema and "anyOf" not in schema):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value
