"""GGUFTokenizer: the part of a transformers tokenizer the worker uses (encode, decode,
convert_ids_to_tokens, apply_chat_template, get_vocab, len, eos_token_id), backed by llama.cpp's own vocabulary.

It reads the vocabulary of the engine's model where that model is never freed (sleep releases
it in place: model.py), else of a vocab-only model of its own (a few MB, ~0.1 s to load), so it
keeps working while the engine is asleep with its model freed: a request that wakes the engine
is tokenized first. llama.cpp's vocabulary is read-only once loaded: the step thread's
llama_decode and this object's calls on other threads do not disturb each other.
The chat template is the GGUF's `tokenizer.chat_template`, rendered with jinja2 as
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import json
from datetime import datetime
from pathlib import Path

import llama_cpp as lc

_BACKGROUND = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dormant-vocab")


class NoChatTemplate(ValueError):
    pass


def meta_str(model, key: str) -> str | None:
    """A GGUF metadata value as text, or None where the file has no such key."""
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1


class GGUFTokenizer:
    def __init__(self, gguf: Path, model=None):
        """`model`: a loaded llama_model that outlives this object (its vocabulary is used),
        or None: a vocab-only model of its own is loaded."""
        self._owns_model = model is None
        if model is None:
            params = lc.llama_model_default_params()
            params.vocab_only = True
            model = lc.llama_model_load_from_file(str(gguf).encode(), params)
            if not model:
                raise ValueError(f"llama.cpp could not read the vocabulary of {gguf}")
        self._model = model
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = lc.llama_vocab_n_tokens(self._vocab)
        self.chat_template = meta_str(self._model, "tokenizer.chat_template")
        self.bos_token_id = _token_or_none(lc.llama_vocab_bos(self._vocab))
        self.eos_token_id = _token_or_none(lc.llama_vocab_eos(self._vocab))
        self.bos_token = self._piece(self.bos_token_id) if self.bos_token_id is not None else None
        self.eos_token = self._piece(self.eos_token_id) if self.eos_token_id is not None else None
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        # text -> id for get_vocab, built beside the load (~0.1-0.25 s of ctypes calls for 49k
        # tokens, which the first request would otherwise wait for: serving's _longest_token)
        self._vocab_future = _BACKGROUND.submit(self._build_vocab_map)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenize(text, add_special=add_special_tokens, parse_special=False)

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        ids = list(token_ids)
        if not ids:
            return ""
        tokens = (lc.llama_token * len(ids))(*ids)
        size = max(64, 16 * len(ids))
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_detokenize(self._vocab, tokens, len(ids), buf, size, False, not skip_special_tokens)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1

    def convert_ids_to_tokens(self, token_ids) -> list[str]:
        """Each id's token as the vocabulary spells it (BPE's `Ġcapital`, as transformers
        gives it), not its decoded text: /tokenize's return_token_strs."""
        return [lc.llama_vocab_get_text(self._vocab, t).decode("utf-8", errors="replace") for t in token_ids]

    def get_vocab(self) -> dict[str, int]:
        return self._vocab_future.result()

    @property
    def eog_token_ids(self) -> frozenset[int]:
        """Every end-of-generation token (eos, eot, <|im_end|>...)."""
        return frozenset(t for t in range(self.vocab_size) if lc.llama_vocab_is_eog(self._vocab, t))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """The messages rendered by the GGUF's template; ids (template text, special tokens
        parsed, nothing added: the template writes its own BOS) or the text."""
        if not self.chat_template:
            raise NoChatTemplate("this model's GGUF has no chat template (tokenizer.chat_template): "
                                 "use /v1/completions with a prompt, or a GGUF that carries one")
        text = _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self._tokenize(text, add_special=False, parse_special=True) if tokenize else text

    def close(self) -> None:
        self._vocab_future.result()  # it reads the vocabulary freed here
        if self._model and self._owns_model:
            lc.llama_model_free(self._model)
        self._model = None

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            tokens = (lc.llama_token * size)()
            n = lc.llama_tokenize(self._vocab, data, len(data), tokens, size, add_special, parse_special)
            if n >= 0:
                return tokens[:n]
            size = -n

    def _piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def _build_vocab_map(self) -> dict[str, int]:
        return {self._piece(t): t for t in range(self.vocab_size)}


def _token_or_none(token: int) -> int | None:
    return None if token < 0 else token


@functools.cache
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
