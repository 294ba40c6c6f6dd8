"""One engine request of an answer (a candidate) and the pieces of text it yields.

An answer has n candidates per prompt (best_of where larger); each is its own engine request,
and those of one prompt share its KV blocks through the prefix cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dormant.engines.base import SamplingParams, TokenLogprob
from dormant.worker.detokenizer import IncrementalDetokenizer


@dataclass
class Candidate:
    """A generation for prompt `prompt_index` of the request."""

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class Piece:
    """What a candidate adds to its choice: text, and the logprobs of the tokens behind it."""

    text: str
    finish_reason: str | None
    num_tokens: int  # completion tokens so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # since the previous piece
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first piece, when asked


async def run_candidate(state, candidate: Candidate, stop: list[str],
                        timing: dict[str, float] | None = None) -> AsyncIterator[Piece]:
    """Pieces as text becomes safe to send; the last has a finish reason. Logprobs of tokens
    whose text is held back (a possible stop string, an incomplete character) wait for the
    next piece. `timing` gets "first_token_s": seconds from here to the first token."""
    detok = IncrementalDetokenizer(state.tokenizer, stop)
    num_completion = 0
    pending: list[TokenLogprob] = []
    prompt_logprobs = None
    arrived = time.time()
    stream = state.engine.generate(candidate.request_id, candidate.prompt_ids, candidate.params)
    async with contextlib.aclosing(stream):
        async for out in stream:
            if not num_completion:
                state.note_first_token(arrived)
                if timing is not None and "first_token_s" not in timing:
                    timing["first_token_s"] = time.time() - arrived
            num_completion += len(out.new_token_ids)
            pending += out.logprobs or []
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
            delta = detok.add(out.new_token_ids)
            reason = "stop" if detok.stopped else out.finish_reason if out.finished else None
            if out.finished and not detok.stopped:
                delta += detok.flush()
            if delta or reason:
                yield Piece(delta, reason, num_completion, pending, prompt_logprobs)
                pending, prompt_logprobs = [], None
            if reason:
                return  # closing the stream aborts the request in the engine (a stop string)
