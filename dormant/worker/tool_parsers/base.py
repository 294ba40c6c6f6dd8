"""What every tool-call parser shares: finding call regions in a reply, whole or streamed.

A format says where a call region opens (`starts`, or `starts_at_beginning` for markers that
count only at the reply's start, such as Llama's bare `{`), where it closes (`end`, or None:
at the reply's end) and how a region's text becomes calls (`parse_region`). Text outside
regions is content. A region that does not parse (malformed JSON, an unknown shape) is given
back as content, never dropped. The whole-reply parse is the streamed one run to the end, so
the two always agree.

A call is emitted once its region closes: only then is it known to parse (the spec's chunks
allow it whole: the name first, then its arguments as one piece).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dormant.protocol import ChatTool, FunctionCall, ToolCall


@dataclass
class ToolCallDelta:
    """What one step of a streamed reply adds: content text and calls completed since."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class ToolParser:
    starts: tuple[str, ...] = ()
    starts_at_beginning: tuple[str, ...] = ()
    end: str | None = None

    def __init__(self, tools: list[ChatTool] | None = None) -> None:
        self.schemas = {t.function.name: t.function.parameters or {} for t in tools or []}
        self._buf = ""  # text not yet placed: content, or the start of a region
        self._region: str | None = None  # the open region's text, markers included
        self._marker = ""  # the marker that opened it
        self._pending_space = ""  # whitespace held: dropped where it only separates calls
        self._seen_text = False  # any non-space content yet (beginning-only markers are off)
        self.num_calls = 0

    # ---- the format's part ---------------------------------------------------------------

    def parse_region(self, region: str) -> list[FunctionCall] | None:
        """The calls in one region (its markers included, the end one possibly missing), or
        None when it is not a well-formed call."""
        raise NotImplementedError

    # ---- streaming ---------------------------------------------------------------------------

    def feed(self, text: str) -> ToolCallDelta:
        self._buf += text
        out = ToolCallDelta()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> ToolCallDelta:
        """The end of the reply: an open region is parsed as it stands; held text goes out."""
        out = ToolCallDelta()
        while self._step(out, final=True):
            pass
        if self._region is not None:
            self._close(self._region, out)
            self._region = None
        self._content(self._buf, out)
        self._buf = ""
        if not self.num_calls:
            out.content += self._pending_space
        self._pending_space = ""
        return out

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply: (content, calls); content is None when the reply is only calls."""
        first, last = self.feed(text), self.finish()
        calls = first.tool_calls + last.tool_calls
        content = first.content + last.content
        return (content or None) if calls else content, calls

    def _step(self, out: ToolCallDelta, final: bool) -> bool:
        """Place what can be placed of the buffer; True when there may be more to do."""
        if self._region is None:
            at, marker = self._find_start()
            if at < 0:
                keep = 0 if final else self._partial_start_len()
                self._content(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            self._content(self._buf[:at], out)
            self._pending_space = ""  # space before a call separates, it is no content
            self._region, self._buf = self._buf[at:], ""
            self._marker = marker
            return True
        self._region += self._buf
        self._buf = ""
        if self.end is None:
            return False
        closing = self._region.find(self.end, len(self._marker))
        if closing < 0:
            return False
        cut = closing + len(self.end)
        self._close(self._region[:cut], out)
        self._buf, self._region = self._region[cut:], None
        return True

    def _find_start(self) -> tuple[int, str]:
        found = [(self._buf.find(m), m) for m in self.starts if m in self._buf]
        if not self._seen_text and not self.num_calls:
            stripped = self._buf.lstrip()
            found += [(len(self._buf) - len(stripped), m) for m in self.starts_at_beginning if stripped.startswith(m)]
        return min(found) if found else (-1, "")

    def _partial_start_len(self) -> int:
        """How much of the buffer's tail could still grow into a start marker: held back."""
        if not self._seen_text and not self.num_calls:
            stripped = self._buf.lstrip()
            if not stripped or any(m.startswith(stripped) for m in self.starts_at_beginning):
                return len(self._buf)
        for k in range(min(len(self._buf), max(map(len, self.starts), default=0)), 0, -1):
            if any(m.startswith(self._buf[-k:]) for m in self.starts):
                return k
        return 0

    def _close(self, region: str, out: ToolCallDelta) -> None:
        calls = self.parse_region(region)
        if calls is None:
            self._content(region, out)
            return
        for call in calls:
            out.tool_calls.append(ToolCall(function=call))
            self.num_calls += 1

    def _content(self, text: str, out: ToolCallDelta) -> None:
        if not text:
            return
        # trailing whitespace waits for what follows: before a call it is only a separator
        self._pending_space += text
        shown = self._pending_space.rstrip()
        if shown:
            out.content += shown
            self._pending_space = self._pending_space[len(shown):]
            self._seen_text = True


def call_from_json(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> FunctionCall | None:
    """`{"name": ..., "arguments": {...}}` as a FunctionCall; None for any other shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


def json_values(text: str, separators: str = "") -> list[Any] | None:
    """The JSON values written one after another in `text` (whitespace and `separators`
    between them); None when anything else is there."""
    decoder = json.JSONDecoder()
    values, at = [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
