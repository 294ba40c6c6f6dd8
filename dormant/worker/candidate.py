"""One engine request of an answer (a candidate) and the pieces of text it yields.

An answer has n candidates per prompt (best_of where larger); each is its own engine request,
and those of one prompt share its KV blocks through the prefix cache: the first runs alone
until its prompt is computed (its first token), then the others start and find the prompt's
full blocks cached. Started together, each would compute the prompt: blocks are hashed only
once a step has computed them.
"""

from __future__ import annotations

import asyncio
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
    prefilled: asyncio.Event | None = None  # the first of a prompt's candidates sets it...
    after: asyncio.Event | None = None  # ...and the others wait for it


@dataclass
class Piece:
    """What a candidate adds to its choice: text, and the logprobs of the tokens behind it."""

    text: str
    finish_reason: str | None
    num_tokens: int  # completion tokens so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # since the previous piece
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first piece, when asked
    stop_reason: str | None = None  # with the last: the stop string that ended it (vLLM's field)


async def run_candidate(state, candidate: Candidate, stop: list[str],
                        timing: dict[str, float] | None = None) -> AsyncIterator[Piece]:
    """Pieces as text becomes safe to send; the last has a finish reason. Logprobs of tokens
    whose text is held back (a possible stop string, an incomplete character) wait for the
    next piece. `timing` gets "first_token_s": seconds from here to the first token."""
    detok = IncrementalDetokenizer(state.tokenizer, stop)
    arrived = time.time()
    if candidate.after is not None:
        await candidate.after.wait()
    stream = state.engine.generate(candidate.request_id, candidate.prompt_ids, candidate.params)
    try:
        pieces = _pieces(state, stream, detok, arrived, timing, candidate.prefilled)
        async with contextlib.aclosing(stream), contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece
                if piece.finish_reason:
                    return  # closing the stream aborts the request in the engine (a stop string)
    finally:
        if candidate.prefilled is not None:
            candidate.prefilled.set()  # an error or an early end must not hold the others back


async def _pieces(state, stream, detok: IncrementalDetokenizer, arrived: float, timing, prefilled):
    num_completion = 0
    pending: list[TokenLogprob] = []
    prompt_logprobs = None
    async for out in stream:
        if not num_completion:
            if prefilled is not None:
                prefilled.set()
            state.note_first_token(arrived)
            if timing is not None and "first_token_s" not in timing:
                timing["first_token_s"] = time.time() - arrived
        num_completion += len(out.new_token_ids)
        pending += out.logprobs or []
        if out.finish_reason == "stop" and out.logprobs:
            pending.pop()  # the EOS or stop token: no part of the text, so none of its logprobs
        prompt_logprobs = prompt_logprobs or out.prompt_logprobs
        delta = detok.add(out.new_token_ids)
        reason = "stop" if detok.stopped else out.finish_reason if out.finished else None
        if out.finished and not detok.stopped:
            delta += detok.flush()
        if delta or reason:
            yield Piece(delta, reason, num_completion, pending, prompt_logprobs, detok.stop_string)
            pending, prompt_logprobs = [], None
        if reason:
            return
