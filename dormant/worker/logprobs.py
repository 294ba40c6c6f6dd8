"""The engine's TokenLogprobs in OpenAI's two shapes: chat's list of entries (token, logprob,
bytes, top_logprobs) and the legacy completions' parallel lists (tokens, token_logprobs,
top_logprobs, text_offset). A token is shown as its own decoded text, as vLLM shows it."""

from __future__ import annotations

from dormant.engines.base import TokenLogprob
from dormant.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)


class LogprobFormatter:
    """Per tokenizer: the text of each token id, decoded once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return text

    def chat(self, entries: list[TokenLogprob], num_top: int) -> ChoiceLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.piece(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = [TokenLogprobEntry(**top(e.token_id, e.logprob).model_dump(),
                                     top_logprobs=[top(t, lp) for t, lp in e.top[:num_top]])
                   for e in entries]
        return ChoiceLogprobs(content=content)

    def completion(self, token_ids: list[int], entries: list[TokenLogprob | None], num_top: int,
                   offset: int) -> CompletionLogprobs:
        """The tokens `token_ids` with their entries (None for the prompt's first token, which
        nothing predicts); `offset`: the text_offset of the first (its place in the choice's text)."""
        out = CompletionLogprobs()
        for token_id, e in zip(token_ids, entries):
            out.tokens.append(self.piece(token_id))
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(e.logprob)
            top = {self.piece(t): lp for t, lp in e.top[:num_top]}
            top.setdefault(out.tokens[-1], e.logprob)  # OpenAI's: the chosen token is always listed
            out.top_logprobs.append(top)
        return out


def merge(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + second.text_offset,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              tokens=first.tokens + second.tokens, top_logprobs=first.top_logprobs + second.top_logprobs)
