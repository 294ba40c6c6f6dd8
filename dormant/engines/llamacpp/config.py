"""The llama.cpp engine's settings: typed data, defaults in one place, checked at config load
without the binding (the gateway imports this)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dormant.engines.base import EngineArgsError

DEFAULT_MAX_MODEL_LEN = 2048


@dataclass
class LlamaCppConfig:
    # sequences decoded together in one llama_decode; each request holds one sequence id
    max_num_seqs: int = 8
    # one request's context; default min(the GGUF's context length, DEFAULT_MAX_MODEL_LEN).
    # Every sequence has a KV stream of its own of this many cells (llama.cpp's kv_unified
    # off): a request's greedy tokens are then the same alone or batched (in one shared cache
    # its cells land among other sequences' and the attention's sums run in another order). The cache is allocated and
    # zeroed whole at the start: 2048 x 8 cells is 377 MB for SmolLM2-135M (sleep hands its
    # pages back and a wake takes back only those that steps write: model.py).
    max_model_len: int | None = None
    # tokens one llama_decode takes (decodes first, then prompt chunks in what is left)
    max_num_batched_tokens: int = 512
    num_threads: int | None = None  # default: every core this process may use
    # a finished request's KV stays in its sequence: a later prompt that shares its start
    # computes only the rest (llama-server's slot cache, one sequence per slot)
    enable_prefix_caching: bool = True
    # sleep level 1 keeps the KV of the most recently finished sequences, up to this many bytes,
    # in the worker's memory (llama_state_seq_get_data); wake puts it back, so a prompt that
    # starts as one before the sleep (a system prompt, a chat's history) computes only the rest.
    # SmolLM2: 23 KB a token, so 32 MiB keeps ~1,400 tokens. 0: sleep forgets every prefix
    asleep_prefix_cache_bytes: int = 32 << 20
    use_mmap: bool = True  # off: the weights are read into memory instead of mapped
    # llama.cpp's extra weight layouts (repacked for AVX2/AVX512 kernels, AMX tiles). None: on
    # unless the CPU has AMX: ggml's AMX matmul dies with SIGSEGV (ldtilecfg) on the Xeons this
    # project runs on (llama-cpp-python 0.3.36 built with -march=native), whatever the file
    weight_repacking: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise EngineArgsError(name, f"llamacpp engine: {name} must be positive, got {value}")
        if self.asleep_prefix_cache_bytes < 0:
            raise EngineArgsError("asleep_prefix_cache_bytes", "llamacpp engine: asleep_prefix_cache_bytes "
                                  f"must be 0 or more, got {self.asleep_prefix_cache_bytes}")
        if self.num_threads is None:
            self.num_threads = len(os.sched_getaffinity(0))
        if self.weight_repacking is None:
            self.weight_repacking = not _cpu_has_amx()

    def resolve(self, n_ctx_train: int) -> None:
        """Fill what depends on the model: the context length."""
        if self.max_model_len is None:
            self.max_model_len = min(n_ctx_train or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)

    @property
    def kv_cache_tokens(self) -> int:
        return self.max_model_len * self.max_num_seqs

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> LlamaCppConfig:
        return cls(**check_engine_args(dict(args or {})))


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


_TYPES = {f.name: (bool,) if f.type.startswith("bool") else (int,) for f in fields(LlamaCppConfig)}


def check_engine_args(args: dict[str, Any]) -> dict[str, Any]:
    """EngineArgsError names a key this engine does not have, or a value of the wrong type."""
    known = sorted(_TYPES)
    for key, value in args.items():
        if key not in _TYPES:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise EngineArgsError(key, f"unknown key {key!r} for the llamacpp engine; {hint}known keys: {', '.join(known)}")
        if value is None:
            continue
        wanted = _TYPES[key]
        if isinstance(value, bool) != (wanted == (bool,)) or not isinstance(value, wanted):
            raise EngineArgsError(key, f"{key} takes {'true or false' if wanted == (bool,) else 'a whole number'}, got {value!r}")
    return args


def find_gguf(path: Path) -> Path:
    """The GGUF a source path names: the file itself, or the one .gguf in a folder."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
        raise ValueError(f"llamacpp engine: {path} holds {what}; name the file as the model source")
    return found[0]
