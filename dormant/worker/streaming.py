"""A streamed answer: the candidates of a request (n per prompt) run side by side, each piece
sent as the spec's chunk for its choice index as soon as it comes; chat opens every choice
with a role delta; with `include_usage` one last chunk carries the usage; `data: [DONE]` ends
it. Logprobs ride on the chunk of the text they belong to."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from dormant.protocol import (
    SSE_DONE,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
    sse_event,
)
from dormant.worker.candidate import Candidate, Piece, run_candidate
from dormant.worker.logprobs import LogprobFormatter, merge

if TYPE_CHECKING:
    from dormant.worker.server import WorkerState
    from dormant.worker.serving import Candidate, Piece

_END = object()


async def stream_answer(state: WorkerState, req, request_id: str, todo: list[Candidate],
                        new_reply=None) -> AsyncIterator[bytes]:
    """`new_reply` (chat; None for completions): makes each choice's ReplyParser, which turns
    its text into content, reasoning and tool-call deltas."""
    chat = new_reply is not None
    created, model, include_usage = int(time.time()), req.model, req.include_usage
    n = req.n or 1
    fmt = LogprobFormatter(state.tokenizer)
    event = functools.partial(chunk_event, chat, request_id, created, model, include_usage)
    plain = PlainChunks(event, chat)
    indices = {c.request_id: c.prompt_index * n + j % n for j, c in enumerate(todo)}
    if chat:
        for c in todo:
            yield event(ChunkChoice(index=indices[c.request_id], delta=ChunkDelta(role="assistant", content="")))
    replies = {index: new_reply() for index in indices.values()} if chat else {}
    num_completion: dict[str, int] = {}
    offsets: dict[int, int] = {}  # completions: text_offset of each choice's next token
    async with contextlib.aclosing(_pieces_side_by_side(state, todo, indices, req.stop_list)) as items:
        async for index, candidate, piece in items:
            num_completion[candidate.request_id] = piece.num_tokens
            if chat:
                logprobs = fmt.chat(piece.logprobs, req.top_logprobs or 0) if req.logprobs else None
                reply = replies[index]
                deltas = reply.feed(piece.text) + (reply.finish() if piece.finish_reason is not None else [])
                if not deltas and piece.logprobs and logprobs is not None:
                    deltas = [ChunkDelta(content="")]  # the logprobs of tokens whose text is still held back
                for k, delta in enumerate(deltas):  # the piece's logprobs ride on its first delta
                    if logprobs is None and _is_plain(delta):
                        yield plain(index, delta.content)
                    else:
                        yield event(ChunkChoice(index=index, delta=delta, logprobs=logprobs if k == 0 else None))
                if piece.finish_reason is not None:
                    reason = reply.finish_reason(piece.finish_reason)
                    yield event(ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason,
                                            stop_reason=piece.stop_reason))
            else:
                if req.logprobs is None and not req.echo:
                    if piece.text:
                        yield plain(index, piece.text)
                else:
                    choice = _completion_choice(fmt, req, index, candidate, piece, offsets)
                    if choice.text or choice.logprobs is not None and choice.logprobs.tokens:
                        yield event(choice)
                if piece.finish_reason is not None:
                    yield event(CompletionChoice(index=index, text="", finish_reason=piece.finish_reason,
                                                 stop_reason=piece.stop_reason))
    if include_usage:
        num_prompt = sum(len(c.prompt_ids) for c in todo if indices[c.request_id] % n == 0)
        total = sum(num_completion.values())
        yield event(None, Usage(prompt_tokens=num_prompt, completion_tokens=total, total_tokens=num_prompt + total))
    yield SSE_DONE


async def _pieces_side_by_side(state: WorkerState, todo: list[Candidate], indices: dict[str, int],
                               stop: list[str]) -> AsyncIterator[tuple[int, Candidate, Piece]]:
    """(choice index, candidate, piece) as each candidate's pieces come. One candidate (nearly
    every request) is read directly; several run as tasks into one queue. Closing this (a
    client gone) closes every candidate's stream, which aborts it."""
    if len(todo) == 1:
        candidate = todo[0]
        async with contextlib.aclosing(run_candidate(state, candidate, stop)) as pieces:
            async for piece in pieces:
                yield indices[candidate.request_id], candidate, piece
        return
    out: asyncio.Queue = asyncio.Queue()

    async def feed(index: int, candidate: Candidate) -> None:
        try:
            async for piece in run_candidate(state, candidate, stop):
                await out.put((index, candidate, piece))
        except BaseException as exc:  # noqa: BLE001 - handed to the stream, which raises it
            await out.put(exc)
        finally:
            await out.put(_END)

    tasks = [asyncio.create_task(feed(indices[c.request_id], c)) for c in todo]
    try:
        running = len(tasks)
        while running:
            item = await out.get()
            if item is _END:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def chunk_event(chat: bool, request_id: str, created: int, model: str, include_usage: bool,
                choice, usage: Usage | None = None) -> bytes:
    """One SSE chunk of a streamed answer (`choice` None: the usage chunk)."""
    cls = ChatCompletionChunk if chat else CompletionResponse
    body = cls(id=request_id, created=created, model=model, choices=[choice] if choice else [], usage=usage)
    data = body.model_dump()
    for one in data["choices"]:  # a chunk names its stop string only on the last one (vLLM's way)
        if one.get("stop_reason") is None:
            one.pop("stop_reason", None)
    if not include_usage or usage is None and not chat:
        # without include_usage the field is left out, not null; a completion chunk leaves
        # out its null usage too (the spec's completion usage is an object, never null)
        data.pop("usage", None)
    return sse_event(data)


class PlainChunks:
    """The chunk of a choice's text alone (no logprobs, no role, reasoning or tool call: nearly
    every chunk of a stream), as `event` writes it, from a template made once per choice index:
    `event` builds two pydantic models and dumps them, ~15 % of the worker's event-loop time per
    chunk in a burst of 64 streams (issue 12). tests/unit/worker/test_streaming.py checks the
    bytes against `event`'s."""

    _MARK = "\x00plain\x00"

    def __init__(self, event, chat: bool) -> None:
        self._event, self._chat = event, chat
        self._templates: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, index: int, text: str) -> bytes:
        template = self._templates.get(index)
        if template is None:
            choice = (ChunkChoice(index=index, delta=ChunkDelta(content=self._MARK)) if self._chat
                      else CompletionChoice(index=index, text=self._MARK, finish_reason=None))
            head, _, tail = self._event(choice).partition(json.dumps(self._MARK).encode())
            template = self._templates[index] = (head, tail)
        return template[0] + json.dumps(text).encode() + template[1]


def _is_plain(delta: ChunkDelta) -> bool:
    return (delta.content is not None and delta.role is None and delta.reasoning_content is None
            and delta.tool_calls is None)


def _completion_choice(fmt: LogprobFormatter, req, index: int, candidate: Candidate, piece: Piece,
                       offsets: dict[int, int]) -> CompletionChoice:
    """A piece's chunk, without its finish reason; with `echo`, the choice's first chunk starts
    with the prompt (and its logprobs). `offsets`: each choice's text_offset so far."""
    first = index not in offsets
    echo = fmt.tokenizer.decode(candidate.prompt_ids) if req.echo and first else ""
    offsets.setdefault(index, len(echo))
    logprobs = None
    if req.logprobs is not None:
        logprobs = fmt.completion([lp.token_id for lp in piece.logprobs], piece.logprobs, req.logprobs, offsets[index])
        offsets[index] += sum(map(len, logprobs.tokens))
        if echo:
            prompt_logprobs = piece.prompt_logprobs or [None] * len(candidate.prompt_ids)
            logprobs = merge(fmt.completion(candidate.prompt_ids, prompt_logprobs, req.logprobs, 0), logprobs)
    return CompletionChoice(index=index, text=echo + piece.text, logprobs=logprobs, finish_reason=None)
