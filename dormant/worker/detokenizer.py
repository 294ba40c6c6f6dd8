"""Incremental detokenization with stop strings.

Each step decodes only a short window of tokens (vLLM's prefix/read offsets), so the cost per
token stays flat however long the output grows; re-decoding the whole output every step made
a 2,000-token answer quadratic. Text is emitted only once it can no longer change: a trailing incomplete UTF-8 sequence
("\ufffd") and any suffix that could still grow into a stop string are held back, so a
partial stop string is never sent. The stop string itself is excluded from the output.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (possibly ahead of what was emitted)
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] decode to the text's tail
        self.read_offset = 0
        self.num_emitted_chars = 0
        self.stopped = False
        self.stop_string: str | None = None  # the stop string found, once stopped by one

    def add(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit. Sets ``stopped`` on a stop string."""
        self.token_ids.extend(token_ids)
        self._decode_window(final=False)
        text = self.text
        if self.stop:
            start = max(0, self.num_emitted_chars - max(map(len, self.stop)) + 1)
            hits = [(at, s) for at, s in ((text.find(s, start), s) for s in self.stop) if at >= 0]
            if hits:
                at, self.stop_string = min(hits, key=lambda hit: hit[0])  # the earliest wins
                self.stopped = True
                return self._emit_upto(at)
        end = len(text)
        while end > self.num_emitted_chars and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._partial_stop_len(text[:end])
        return self._emit_upto(end)

    def flush(self) -> str:
        """At the end of generation: whatever is left (no stop string can complete any more)."""
        if self.stopped:
            return ""
        self._decode_window(final=True)
        return self._emit_upto(len(self.text))

    def _decode_window(self, final: bool) -> None:
        """Append the text of the tokens after ``read_offset``, decoded with a little context
        before them so that merges across the boundary (leading spaces, multi-byte
        characters) come out as a full decode would give them."""
        if self.read_offset == len(self.token_ids):
            return
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset])
        window = decode(self.token_ids[self.prefix_offset :])
        if window.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for the token that completes it
        self.text += window[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)

    def _emit_upto(self, end: int) -> str:
        if end <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
