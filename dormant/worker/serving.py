"""Serving: an OpenAI completion request in, the engine's tokens out, as a whole answer or SSE.

The routes (worker/server.py) parse the request; here it becomes prompt ids
(`chat_prompt_ids`, `completion_prompt_ids`) and SamplingParams, runs through the engine
(`generate`), is detokenized with stop strings applied, and goes back as an OpenAI body or
stream. A request field left out takes the model's own default (`sampling_defaults`).

Every client mistake found here (token ids, the chat template, the context length) is an
InvalidRequest raised before a StreamingResponse exists, so even a stream is refused with a
plain 400. A non-streamed answer is abandoned, its generation aborted, once its client leaves
(issue 15, item 2: streams are aborted by Starlette, which cancels their body on a disconnect).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dormant.engines.base import SamplingParams
from dormant.disconnect import CLIENT_CLOSED_REQUEST, unless_client_leaves
from dormant.errors import InvalidRequest
from dormant.protocol import (
    FIRST_TOKEN_HEADER,
    SSE_DONE,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    sse_event,
)
from dormant.worker.chat_template import render_chat
from dormant.worker.detokenizer import IncrementalDetokenizer
from dormant.worker.reply import ReplyParser

if TYPE_CHECKING:
    from dormant.worker.server import WorkerState


# One thread, so a tokenizer is never used by two at once (a fast tokenizer's Rust core refuses
# a second borrow) and a flood of long prompts takes one core, not all; the event loop, which
# carries every other stream, never tokenizes.
_TOKENIZING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dormant-tokenize")


async def prompt_ids(state: WorkerState, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
    """The request's prompt as token ids. A text too long for the context is refused before it
    is tokenized (issue 15, item 1: 50 MB took minutes and 12 GiB to be refused), and the
    tokenizing itself runs off the event loop."""
    chat = isinstance(req, ChatCompletionRequest)
    chars = sum(len(m.text()) for m in req.messages) if chat else len(_prompt_text(req.prompt) or "")
    limit = _longest_token(state.tokenizer) * state.max_model_len
    if chars > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt has "
            f"{chars} characters, more than {state.max_model_len} tokens can hold. Please reduce the length of the prompt.",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    tokenize = chat_prompt_ids if chat else completion_prompt_ids
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZING, tokenize, state.tokenizer, req)


@functools.cache
def _longest_token(tokenizer) -> int:
    """The most characters of text one token stands for: no vocabulary entry is shorter than the
    text it encodes (byte-level BPE spells each byte as one character, SentencePiece's byte
    fallback as six), so a text of n characters is at least n / this many tokens. Deciding on it
    refuses only prompts that could never fit (SmolLM2's longest entry is 81 characters)."""
    return max(map(len, tokenizer.get_vocab()))


def _prompt_text(prompt) -> str | None:
    """The text of a completion prompt (the first of a list), or None for token ids."""
    if isinstance(prompt, list):
        return prompt[0] if prompt and isinstance(prompt[0], str) else None
    return prompt


def chat_prompt_ids(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """The messages (tools, tool calls and results too) through the model's chat template."""
    return render_chat(tokenizer, req)


def completion_prompt_ids(tokenizer, req: CompletionRequest) -> list[int]:
    """`prompt` as text (the first of a list) or as token ids, checked against the vocabulary."""
    text = _prompt_text(req.prompt)
    if text is not None:
        return tokenizer.encode(text)
    prompt_ids = list(req.prompt)
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise InvalidRequest(f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
    return prompt_ids


def sampling_defaults(model_dir) -> dict[str, float]:
    """temperature / top_p from the model's generation_config.json, where it samples."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if cfg.get("do_sample") is False:
        return {}
    return {k: float(cfg[k]) for k in ("temperature", "top_p") if isinstance(cfg.get(k), (int, float))}


def _sampling_params(req, num_prompt_tokens: int, max_model_len: int, defaults: dict[str, float]) -> SamplingParams:
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens. Please reduce the length of the prompt.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    _check_max_tokens(req, num_prompt_tokens, max_model_len)
    return SamplingParams(
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_p=defaults["top_p"] if req.top_p is None else req.top_p,
        seed=req.seed,
        max_tokens=req.max_output_tokens,
        ignore_eos=bool(req.ignore_eos),
        guidance=None if (constraint := req.output_constraint()) is None else constraint.guidance,
    )


async def _check_output_constraint(state: WorkerState, req) -> None:
    """A schema, regex or grammar the engine cannot follow is a 400 naming its param, before
    the request reaches the engine (a stream too is refused before it starts)."""
    constraint = req.output_constraint()
    if constraint is not None:
        error = await state.engine.check_guidance(constraint.guidance)
        if error is not None:
            raise InvalidRequest(f"Invalid value for '{constraint.param}': {error}", param=constraint.param)


def _check_max_tokens(req, num_prompt_tokens: int, max_model_len: int) -> None:
    """A `max_tokens` the context cannot hold is refused, as vLLM does (issue 15, item 10); one
    left out runs to the context (chat) or is the spec's 16 (completions), cut there too."""
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    asked = getattr(req, param)
    room = max_model_len - num_prompt_tokens
    if asked is not None and asked > room:
        raise InvalidRequest(
            f"'{param}' is too large: {asked}. This model's maximum context length is {max_model_len} tokens "
            f"and your request has {num_prompt_tokens} input tokens ({asked} > {max_model_len} - {num_prompt_tokens}).",
            param=param,
        )


async def generate(state: WorkerState, req, prompt_ids: list[int], chat: bool, request: Request) -> Response:
    """The answer to `req` (chat or completion): a JSONResponse, or a StreamingResponse of SSE."""
    params = _sampling_params(req, len(prompt_ids), state.max_model_len, state.sampling_defaults)
    if params.guidance is not None:
        await _check_output_constraint(state, req)
    # a chat reply goes through the model's tool-call and reasoning parsers; a forced call
    # (tool_choice required / named) is a grammar the sampler keeps to
    reply = ReplyParser.for_request(req, state.formats, state.tokenizer.decode(prompt_ids[-16:])) if chat else None
    if reply is not None and reply.guidance is not None:
        if params.guidance is not None:
            raise InvalidRequest("A forced 'tool_choice' cannot be combined with 'response_format'.", param="tool_choice")
        error = await state.engine.check_guidance(reply.guidance)
        if error is not None:
            raise InvalidRequest(f"The tools cannot be forced for this model: {error}", param="tools")
        params.guidance = reply.guidance
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    model = req.model
    created = int(time.time())
    if req.stream:
        body = _stream(state, request_id, model, created, prompt_ids, params, stop, reply, req.include_usage)
        return StreamingResponse(body, media_type="text/event-stream")
    timing: dict[str, float] = {}
    answer = await unless_client_leaves(request, _collect(state, request_id, prompt_ids, params, stop, timing))
    if answer is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text, reason, num_completion = answer
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_completion, total_tokens=len(prompt_ids) + num_completion)
    if chat:
        choice = ChatChoice(message=reply.message(text), finish_reason=reply.finish_reason(reason))
        body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=[choice], usage=usage)
    else:
        body = CompletionResponse(id=request_id, created=created, model=model,
                                  choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage)
    # the gateway's time-to-first-token metric: a whole answer shows only its end
    headers = {FIRST_TOKEN_HEADER: f"{timing['first_token_s']:.6f}"} if "first_token_s" in timing else None
    return JSONResponse(body.model_dump(), headers=headers)


async def _collect(state, request_id, prompt_ids, params, stop, timing) -> tuple[str, str | None, int]:
    pieces, reason, num_completion = [], None, 0
    async for delta, finish_reason, n in _run(state, request_id, prompt_ids, params, stop, timing):
        pieces.append(delta)
        reason, num_completion = finish_reason or reason, n
    return "".join(pieces), reason, num_completion


async def _run(state, request_id, prompt_ids, params, stop,
               timing: dict[str, float] | None = None) -> AsyncIterator[tuple[str, str | None, int]]:
    """Yield (text delta, finish_reason or None, completion tokens so far); the last item has a
    reason. `timing` gets "first_token_s": seconds from here to the first token."""
    detok = IncrementalDetokenizer(state.tokenizer, stop)
    num_completion = 0
    arrived = time.time()
    stream = state.engine.generate(request_id, prompt_ids, params)
    async with contextlib.aclosing(stream):
        async for new_ids, finished, reason in stream:
            if not num_completion:
                state.note_first_token(arrived)
                if timing is not None:
                    timing["first_token_s"] = time.time() - arrived
            num_completion += len(new_ids)
            delta = detok.add(new_ids)
            if detok.stopped:
                yield delta, "stop", num_completion
                return  # closing the stream aborts the request in the engine
            if finished:
                yield delta + detok.flush(), reason, num_completion
                return
            if delta:
                yield delta, None, num_completion


async def _stream(state, request_id, model, created, prompt_ids, params, stop, reply, include_usage):
    num_completion = 0
    if reply is not None:
        def chunk(delta: ChunkDelta, reason=None):
            return ChatCompletionChunk(
                id=request_id, created=created, model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=reason)],
            )
        yield sse_event(_usage_null(chunk(ChunkDelta(role="assistant", content="")), include_usage))
    else:
        def chunk(delta: ChunkDelta, reason=None):
            return CompletionResponse(
                id=request_id, created=created, model=model,
                choices=[CompletionChoice(text=delta.content or "", finish_reason=reason)],
            )
    async for delta, reason, n in _run(state, request_id, prompt_ids, params, stop):
        num_completion = n
        deltas = [ChunkDelta(content=delta)] if delta else []
        if reply is not None:
            deltas = reply.feed(delta) + (reply.finish() if reason is not None else [])
        for piece in deltas:
            yield sse_event(_usage_null(chunk(piece), include_usage))
        if reason is not None:
            reason = reply.finish_reason(reason) if reply is not None else reason
            yield sse_event(_usage_null(chunk(ChunkDelta(), reason), include_usage))
    if include_usage:
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_completion, total_tokens=len(prompt_ids) + num_completion)
        final = chunk(ChunkDelta())
        final.choices = []
        final.usage = usage
        yield sse_event(final)
    yield SSE_DONE


def _usage_null(model, include_usage: bool):
    """With include_usage, ordinary chunks carry `usage: null`; without, the field is left out."""
    data = model.model_dump()
    if not include_usage:
        data.pop("usage", None)
    return data
