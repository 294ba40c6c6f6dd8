"""Reasoning parsers: the thinking a model writes before its answer, moved out of `content`
into `reasoning_content` (vLLM's field), whole or streamed.

Both parsers take the `<think>...</think>` form; they differ in where a reply starts:

    qwen3        in the answer, unless the reply opens with `<think>` or the prompt ends inside
                 an open `<think>` (Qwen3's thinking-only models and templates that open it)
    deepseek_r1  in the thinking: R1's template opens `<think>` in the prompt, so the reply is
                 thinking until `</think>` (a reply that never closes it is all thinking)

`chat_template_kwargs: {"enable_thinking": false}` makes Qwen3's template write an empty,
closed think block into the prompt: the reply then starts in the answer, as it should.
The names are worker_api.REASONING_PARSERS, checked at config load.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, starts_in_reasoning: bool) -> None:
        self._default_reasoning = starts_in_reasoning
        self._state = "opening"  # -> "reasoning" -> "answer"
        self._buf = ""
        self._answer_started = False  # leading whitespace after </think> is no answer

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` adds, holding back what may be part of a marker."""
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def parse(self, text: str) -> tuple[str | None, str]:
        """A whole reply: (reasoning or None, content)."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return (r1 + r2) or None, c1 + c2

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self._state == "opening":
            head = self._buf.lstrip()
            if head.startswith(START):
                self._buf, self._state = head[len(START):], "reasoning"
            elif START.startswith(head) and not final:
                return "", ""  # may still become <think>
            else:
                self._state = "reasoning" if self._default_reasoning else "answer"
        if self._state == "reasoning":
            at = self._buf.find(END)
            if at < 0:
                keep = 0 if final else _partial_suffix(self._buf, END)
                reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return reasoning, ""
            reasoning, self._buf, self._state = self._buf[:at], self._buf[at + len(END):], "answer"
        if self._state == "answer":
            if not self._answer_started:
                self._buf = self._buf.lstrip()
                self._answer_started = bool(self._buf)
            content, self._buf = self._buf, ""
        return reasoning, content


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def reasoning_parser(name: str, prompt_tail: str) -> ReasoningParser:
    """The parser `name` for one reply; `prompt_tail` is the end of the rendered prompt (a
    template that opens `<think>` for the model leaves it there)."""
    open_in_prompt = prompt_tail.rfind(START) > prompt_tail.rfind(END)
    if name == "deepseek_r1":
        return ReasoningParser(starts_in_reasoning=True)
    if name == "qwen3":
        return ReasoningParser(starts_in_reasoning=open_in_prompt)
    raise ValueError(f"unknown reasoning parser {name!r}")


def detect_reasoning_parser(template: str) -> str | None:
    if START not in template:
        return None
    return "deepseek_r1" if "<｜Assistant｜>" in template else "qwen3"
