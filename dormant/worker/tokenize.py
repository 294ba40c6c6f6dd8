"""vLLM's /tokenize and /detokenize: the model's own tokenizer, for clients that count tokens
or check a prompt against the context before sending it.

    POST /tokenize    {model, prompt, add_special_tokens=true, return_token_strs=false}
                      or {model, messages, add_generation_prompt=true, return_token_strs=false}
                      -> {count, max_model_len, tokens, token_strs}
    POST /detokenize  {model, tokens} -> {prompt}

Messages go through the chat template exactly as a chat request's do (serving.chat_prompt_ids),
so the count is the prompt a chat request would send.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest, ChatMessage, _Request, parse_request
from dormant.worker.serving import chat_prompt_ids


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def tokenize(tokenizer, max_model_len: int, body: Any) -> dict[str, Any]:
    req = parse_request(TokenizeRequest, body)
    _refuse_extra(req)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("Send either 'prompt' or 'messages'.", param="prompt")
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        if not req.add_generation_prompt:
            raise InvalidRequest("'add_generation_prompt': only true is supported (the prompt a chat request sends).",
                                 param="add_generation_prompt")
        if req.add_special_tokens:
            raise InvalidRequest("'add_special_tokens': the chat template places special tokens for messages.",
                                 param="add_special_tokens")
        chat = parse_request(ChatCompletionRequest, {"model": req.model or "", "messages": body["messages"]})
        ids = chat_prompt_ids(tokenizer, chat)[0]
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tokenizer, body: Any) -> dict[str, Any]:
    req = parse_request(DetokenizeRequest, body)
    _refuse_extra(req)
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for t in req.tokens):
        raise InvalidRequest(f"Token ids in 'tokens' must be in [0, {vocab}).", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


def _refuse_extra(req: _Request) -> None:
    extra = req.ignored_fields()
    if extra:
        raise InvalidRequest(f"Unsupported field(s) {', '.join(map(repr, extra))}.", param=extra[0])
