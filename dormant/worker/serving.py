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
import dataclasses
import functools
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dormant.disconnect import CLIENT_CLOSED_REQUEST, unless_client_leaves
from dormant.engines.base import Guidance, SamplingParams
from dormant.errors import InvalidRequest
from dormant.protocol import (
    FIRST_TOKEN_HEADER,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from dormant.worker.candidate import Candidate, Piece, run_candidate
from dormant.worker.chat_template import render_chat
from dormant.worker.logprobs import LogprobFormatter, merge
from dormant.worker.reply import ReplyParser
from dormant.worker.streaming import stream_answer

if TYPE_CHECKING:
    from dormant.worker.server import WorkerState


# One thread, so a tokenizer is never used by two at once (a fast tokenizer's Rust core refuses
# a second borrow) and a flood of long prompts takes one core, not all; the event loop, which
# carries every other stream, never tokenizes.
_TOKENIZING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dormant-tokenize")


async def prompt_ids(state: WorkerState, req: ChatCompletionRequest | CompletionRequest) -> list[list[int]]:
    """The request's prompts as token ids (a chat has one; a completion one per prompt of its
    batch). A text too long for the context is refused before it is tokenized (issue 15, item
    1: 50 MB took minutes and 12 GiB to be refused), and the tokenizing itself runs off the
    event loop."""
    chat = isinstance(req, ChatCompletionRequest)
    texts = [] if chat else [p for p in req.prompts if isinstance(p, str)]
    chars = sum(len(m.text()) for m in req.messages) if chat else max(map(len, texts), default=0)
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


def chat_prompt_ids(tokenizer, req: ChatCompletionRequest) -> list[list[int]]:
    """The messages (tools, tool calls and results too) through the model's chat template."""
    return [render_chat(tokenizer, req)]


def completion_prompt_ids(tokenizer, req: CompletionRequest) -> list[list[int]]:
    """Each prompt of the batch, as text or as token ids checked against the vocabulary."""
    out, vocab = [], len(tokenizer)
    for i, prompt in enumerate(req.prompts):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
        if not ids:
            raise InvalidRequest(f"Prompt {i} has no tokens.", param="prompt")
        out.append(ids)
    return out


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


def _sampling_params(req, num_prompt_tokens: int, max_model_len: int, defaults: dict[str, float],
                     vocab_size: int | None = None) -> SamplingParams:
    """The one place a request's fields become SamplingParams (`vocab_size`: logit_bias keys
    are checked against it)."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens. Please reduce the length of the prompt.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    _check_max_tokens(req, num_prompt_tokens, max_model_len)
    logit_bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in logit_bias):
        raise InvalidRequest(f"Token ids in 'logit_bias' must be in [0, {vocab_size}).", param="logit_bias")
    chat = isinstance(req, ChatCompletionRequest)
    logprobs = (req.top_logprobs or 0) if chat and req.logprobs else None if chat else req.logprobs
    return SamplingParams(
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_p=defaults["top_p"] if req.top_p is None else req.top_p,
        seed=req.seed,
        max_tokens=req.max_output_tokens,
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=logit_bias,
        top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both mean every token
        min_p=req.min_p or 0.0,
        logprobs=logprobs,
        prompt_logprobs=logprobs if not chat and req.echo else None,
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


def _check_capabilities(state: WorkerState, req, chat: bool) -> None:
    """A field this model's engine cannot honour is a 400 naming it, before anything else looks
    at it (the llamacpp engine has no logprobs and no constrained decoding)."""
    caps = state.engine.capabilities
    if not caps.logprobs:
        asked = [name for name, on in (("logprobs", req.logprobs if chat else req.logprobs is not None),
                                       ("best_of", not chat and (req.best_of or 1) > (req.n or 1))) if on]
        if asked:
            raise InvalidRequest(f"'{asked[0]}' is not supported by this model's engine: it reports no logprobs.",
                                 param=asked[0])
    if not caps.guidance:
        constraint = req.output_constraint()
        forced = chat and req.tool_choice not in (None, "none", "auto")
        param = constraint.param if constraint is not None else "tool_choice" if forced else None
        if param is not None:
            raise InvalidRequest(f"'{param}' is not supported by this model's engine: it has no constrained decoding.",
                                 param=param)


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


def candidates(state: WorkerState, req, prompts: list[list[int]], request_id: str,
               forced: Guidance | None = None) -> list[Candidate]:
    """n per prompt, or best_of where it is larger (ranked by cumulative logprob: they carry
    their chosen tokens' logprobs even when the client did not ask). A seeded request seeds
    its i-th candidate with seed + i: n copies of one draw would be no choice. `forced`: the
    grammar of a forced tool call."""
    n = req.n or 1
    best_of = max(n, getattr(req, "best_of", None) or n)
    out = []
    for p, ids in enumerate(prompts):
        params = _sampling_params(req, len(ids), state.max_model_len, state.sampling_defaults, len(state.tokenizer))
        if forced is not None:
            params = dataclasses.replace(params, guidance=forced)
        if best_of > n and params.logprobs is None:
            params = dataclasses.replace(params, logprobs=0)
        # prompt logprobs turn the prefix cache off (block_manager.py): nothing to wait for
        prefilled = asyncio.Event() if best_of > 1 and params.prompt_logprobs is None else None
        for j in range(best_of):
            seed = None if params.seed is None else params.seed + j
            out.append(Candidate(p, ids, dataclasses.replace(params, seed=seed), f"{request_id}-{p}-{j}",
                                 prefilled=prefilled if j == 0 else None, after=prefilled if j else None))
    return out


async def generate(state: WorkerState, req, prompts: list[list[int]], chat: bool, request: Request) -> Response:
    """The answer to `req` (chat or completion): a JSONResponse, or a StreamingResponse of SSE."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    _check_capabilities(state, req, chat)
    if req.output_constraint() is not None:
        await _check_output_constraint(state, req)
    # a chat reply goes through the model's tool-call and reasoning parsers, one per choice; a
    # forced call (tool_choice required / named), or any call to strict tools, is a grammar the
    # sampler keeps to
    new_reply = None
    forced = None
    if chat:
        new_reply = functools.partial(ReplyParser.for_request, req, state.formats, state.tokenizer.decode(prompts[0][-16:]))
        forced = new_reply().guidance
    if forced is not None:
        if req.output_constraint() is not None:
            raise InvalidRequest("Constrained tool calls (a forced 'tool_choice', or a 'strict' tool) cannot be "
                                 "combined with 'response_format'.", param="tool_choice")
        error = await state.engine.check_guidance(forced)
        if error is not None:
            raise InvalidRequest(f"The tools cannot be forced for this model: {error}", param="tools")
    todo = candidates(state, req, prompts, request_id, forced)
    if req.stream:
        body = stream_answer(state, req, request_id, todo, new_reply)
        return StreamingResponse(body, media_type="text/event-stream")
    timing: dict[str, float] = {}
    work = asyncio.gather(*(_collect(state, c, req.stop_list, timing) for c in todo))
    results = await unless_client_leaves(request, work)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    n = req.n or 1
    fmt = LogprobFormatter(state.tokenizer)
    choices = []
    for p, ids in enumerate(prompts):
        mine = [r for c, r in zip(todo, results) if c.prompt_index == p]
        if len(mine) > n:  # best_of: the n of highest cumulative logprob
            mine = sorted(mine, key=lambda r: -sum(lp.logprob for lp in r.logprobs))[:n]
        for k, r in enumerate(mine):
            choices.append(_choice(fmt, req, new_reply, p * n + k, ids, r))
    num_completion = sum(r.num_tokens for r in results)
    num_prompt = sum(map(len, prompts))
    usage = Usage(prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion)
    created, model = int(time.time()), req.model
    if chat:
        body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
    else:
        body = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
    # the gateway's time-to-first-token metric: a whole answer shows only its end
    headers = {FIRST_TOKEN_HEADER: f"{timing['first_token_s']:.6f}"} if "first_token_s" in timing else None
    return JSONResponse(body.model_dump(), headers=headers)


def _choice(fmt: LogprobFormatter, req, new_reply, index: int, prompt: list[int], r: Piece):
    """One choice of a whole answer; `r` is the candidate's text and logprobs end to end;
    `new_reply` (chat): a ReplyParser for it."""
    if new_reply is not None:
        reply = new_reply()
        logprobs = fmt.chat(r.logprobs, req.top_logprobs or 0) if req.logprobs else None
        return ChatChoice(index=index, message=reply.message(r.text), logprobs=logprobs,
                          finish_reason=reply.finish_reason(r.finish_reason), stop_reason=r.stop_reason)
    text, logprobs = r.text, None
    echo = fmt.tokenizer.decode(prompt) if req.echo else ""
    if req.logprobs is not None:
        logprobs = fmt.completion([lp.token_id for lp in r.logprobs], r.logprobs, req.logprobs, len(echo))
        if req.echo:
            logprobs = merge(fmt.completion(prompt, r.prompt_logprobs or [None] * len(prompt), req.logprobs, 0), logprobs)
    return CompletionChoice(index=index, text=echo + text, logprobs=logprobs, finish_reason=r.finish_reason,
                            stop_reason=r.stop_reason)


async def _collect(state, candidate: Candidate, stop: list[str], timing) -> Piece:
    """A candidate run to its end: its pieces joined."""
    whole = Piece("", None, 0)
    async for piece in run_candidate(state, candidate, stop, timing):
        whole.text += piece.text
        whole.finish_reason = piece.finish_reason or whole.finish_reason
        whole.num_tokens = piece.num_tokens
        whole.logprobs += piece.logprobs
        whole.prompt_logprobs = whole.prompt_logprobs or piece.prompt_logprobs
        whole.stop_reason = piece.stop_reason or whole.stop_reason
    return whole
