"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the reply is `{"name": ..., "parameters": {...}}`,
after `<|python_tag|>` or bare; parallel calls separated by `;`.

`<|python_tag|>` is a special token, which the worker's detokenizer drops, so a reply that
opens with `{` is a call region too (as vLLM's llama3_json parser takes it); `{` later in a
reply is content.
"""

from __future__ import annotations

from dormant.protocol import FunctionCall
from dormant.worker.tool_parsers.base import ToolParser, call_from_json, json_values


class Llama3JsonToolParser(ToolParser):
    starts = ("<|python_tag|>",)
    starts_at_beginning = ("{",)
    end = None

    def parse_region(self, region: str) -> list[FunctionCall] | None:
        values = json_values(region.removeprefix("<|python_tag|>"), separators=";")
        if values is None:
            return None
        calls = [call_from_json(v, ("parameters", "arguments")) for v in values]
        return None if None in calls else calls
