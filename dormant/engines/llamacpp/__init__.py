"""The llama.cpp engine: GGUF models through llama-cpp-python's low-level API, every request
one sequence of a shared KV cache and all of them in one llama_decode per step.

`ENGINE` is what the registry (engines/base.py) finds; importing this module imports neither
torch nor the binding (the gateway checks engine_args through it).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from dormant.engines.base import EngineSpec, LoadedModel
from dormant.engines.llamacpp.config import DEFAULT_MAX_MODEL_LEN, check_engine_args

log = logging.getLogger("dormant.worker")


def is_installed() -> bool:
    """Whether llama-cpp-python is importable here (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _load(model_path: Path, engine_args: dict[str, Any]) -> LoadedModel:
    from dormant.engines.llamacpp.async_engine import AsyncLlamaCppEngine
    from dormant.engines.llamacpp.config import LlamaCppConfig, find_gguf
    from dormant.engines.llamacpp.model import LlamaModel
    from dormant.engines.llamacpp.scheduler import Scheduler
    from dormant.engines.llamacpp.tokenizer import GGUFTokenizer

    config = LlamaCppConfig.from_args(engine_args)
    gguf = find_gguf(Path(model_path))
    started = time.perf_counter()
    model = LlamaModel(gguf, config)
    loaded = time.perf_counter()
    # the model's own vocabulary where it outlives every sleep (no second load, ~0.1 s)
    tokenizer = GGUFTokenizer(gguf, None if model.frees_at_sleep else model.model)
    phases = {"load_gguf": loaded - started, "tokenizer": time.perf_counter() - loaded}
    engine = AsyncLlamaCppEngine(model, Scheduler(model), phases)
    return LoadedModel(engine, tokenizer, config.max_model_len)


# a worker's own memory beside the model's: Python, the binding, llama.cpp's scratch (the
# asleep worker measured 0.1-0.2 GB RSS on the 2-core machine)
WORKER_OVERHEAD_BYTES = 300 * 2**20
KV_ITEMSIZE = 2  # llama.cpp's default KV type, f16


def _memory_footprint(model_path: Path, engine_args: dict[str, Any]) -> tuple[int, int]:
    """Running: the GGUF (mmap'd: its pages count once read), the KV cache (allocated whole at
    the start: a stream of max_model_len cells per sequence) and the worker. Asleep: the worker
    and the prefixes it keeps (model.py hands the rest back)."""
    from dormant.engines.llamacpp.config import LlamaCppConfig, find_gguf
    from dormant.store.gguf_header import KVShape, read_metadata

    gguf = find_gguf(Path(model_path))
    shape = KVShape.of(read_metadata(gguf))
    config = LlamaCppConfig.from_args(engine_args)
    config.resolve(shape.context_length or 0)
    kv = config.kv_cache_tokens * shape.bytes_per_token(KV_ITEMSIZE)
    kept = config.asleep_prefix_cache_bytes if config.enable_prefix_caching else 0
    return gguf.stat().st_size + kv + WORKER_OVERHEAD_BYTES, WORKER_OVERHEAD_BYTES + kept


ENGINE = EngineSpec(
    name="llamacpp",
    check_args=check_engine_args,
    may_use_gpu=lambda engine_args: False,  # this build of the binding runs on the CPU
    prepare=lambda engine_args: None,
    load=_load,
    import_modules=("llama_cpp", "dormant.engines.llamacpp.async_engine"),
    reads_gguf=True,
    default_max_model_len=DEFAULT_MAX_MODEL_LEN,
    is_available=is_installed,
    memory_footprint=_memory_footprint,
    cpu_only=True,  # this build of the binding has no GPU backend
)
