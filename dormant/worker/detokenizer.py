"""Incremental detokenization with stop strings.

Text is emitted only once it can no longer change: a trailing incomplete UTF-8 sequence
("\ufffd") and any suffix that could still grow into a stop string are held back, so a
partial stop string is never sent. The stop string itself is excluded from the output.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted_chars = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit. Sets ``stopped`` on a stop string."""
        self.token_ids.extend(token_ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        text = self.text
        if self.stop:
            start = max(0, self.num_emitted_chars - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit_upto(min(hits))
        end = len(text)
        while end > self.num_emitted_chars and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._partial_stop_len(text[:end])
        return self._emit_upto(end)

    def flush(self) -> str:
        """At the end of generation: whatever is left (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._emit_upto(len(self.text))

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
