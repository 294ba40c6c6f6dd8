"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the newer (v11+)
`[TOOL_CALLS]name[ARGS]{...}` per call.

`[TOOL_CALLS]` and `[ARGS]` are special tokens, which the worker's detokenizer drops: a reply
that opens with `[{` is taken as the list form too. The newer form needs its markers, so it is
parsed where they arrive (a detokenizer that keeps special tokens).
"""

from __future__ import annotations

import json
import re

from dormant.protocol import FunctionCall
from dormant.worker.tool_parsers.base import ToolParser, call_from_json, json_values

_NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[ARGS\])?\s*")


class MistralToolParser(ToolParser):
    starts = ("[TOOL_CALLS]",)
    starts_at_beginning = ("[{",)
    end = None

    def parse_region(self, region: str) -> list[FunctionCall] | None:
        calls: list[FunctionCall] = []
        for part in region.split("[TOOL_CALLS]"):
            if not part.strip():
                continue
            found = self._list_form(part) if part.lstrip().startswith("[") else self._named_form(part)
            if found is None:
                return None
            calls += found
        return calls or None

    @staticmethod
    def _list_form(text: str) -> list[FunctionCall] | None:
        values = json_values(text)
        if values is None:
            return None
        calls = [call_from_json(o) for v in values for o in (v if isinstance(v, list) else [v])]
        return None if not calls or None in calls else calls

    @staticmethod
    def _named_form(text: str) -> list[FunctionCall] | None:
        match = _NAMED.match(text)
        if not match:
            return None
        values = json_values(text[match.end():])
        if values is None or len(values) != 1 or not isinstance(values[0], dict):
            return None
        return [FunctionCall(name=match.group(1), arguments=json.dumps(values[0], ensure_ascii=False))]
