"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
block per call, parallel calls as consecutive blocks."""

from __future__ import annotations

from dormant.protocol import FunctionCall
from dormant.worker.tool_parsers.base import ToolParser, call_from_json, json_values


class HermesToolParser(ToolParser):
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def parse_region(self, region: str) -> list[FunctionCall] | None:
        body = region.removeprefix("<tool_call>").removesuffix("</tool_call>")
        values = json_values(body)
        if values is None:
            return None
        # one object per block as the template asks; a list of them is seen from some models
        objects = [o for v in values for o in (v if isinstance(v, list) else [v])]
        calls = [call_from_json(o) for o in objects]
        return None if not calls or None in calls else calls
