"""The native engine: transformers' model code on our own arena, scheduler and kernels.

`ENGINE` is what the registry (engines/base.py) finds; importing this module imports no torch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dormant.engines.base import EngineSpec, LoadedModel
from dormant.engines.native.core.config import check_engine_args

log = logging.getLogger("dormant.worker")


def _load(model_dir: Path, engine_args: dict[str, Any]) -> LoadedModel:
    from dormant.engines.native.core.async_engine import AsyncLLMEngine
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine
    from dormant.engines.native.core.tokenizer_load import load_tokenizer as load

    config = EngineConfig.from_args(model_dir, engine_args)

    def load_tokenizer():
        started = time.perf_counter()
        tokenizer = load(model_dir)
        return tokenizer, time.perf_counter() - started

    # the tokenizer (a 10 MB tokenizer.json for Qwen3) loads beside the model, off the start's
    # path; where the runner says (its parse holds the GIL, bench/README.md, "Restore: the tokenizer")
    with ThreadPoolExecutor(1, thread_name_prefix="dormant-tokenizer") as pool:
        loading: list[Future] = []
        engine = LLMEngine(config, beside_load=lambda: loading.append(pool.submit(load_tokenizer)))
        if not loading:  # a runner that never called it
            loading.append(pool.submit(load_tokenizer))
        waited = time.perf_counter()
        tokenizer, own = loading[0].result()
    log.info("tokenizer loaded beside the model in %.2f s (waited %.2f s for it)", own, time.perf_counter() - waited)
    engine.use_tokenizer(tokenizer)
    return LoadedModel(AsyncLLMEngine(engine), tokenizer, config.max_model_len)


def _may_use_gpu(engine_args: dict[str, Any]) -> bool:
    return engine_args.get("device", "auto") != "cpu"


def _prepare(engine_args: dict[str, Any]) -> None:
    """On a GPU, or where one may be ("auto" with a CUDA build of torch), the context starts in
    the background. Not through torch.cuda.is_available(): its cuInit (0.2 s) would run here,
    holding the GIL, before anything else of the start (bench/README.md, "Restore: the CUDA context"). Where there
    is no GPU after all, that thread fails and nothing waits for it."""
    if not _may_use_gpu(engine_args):
        return
    import torch

    if torch.version.cuda is not None:
        from dormant.engines.native.cuda import start as cuda_start

        cuda_start.start_cuda_context()


def _context_error() -> str | None:
    """The CUDA context `_prepare` started, once it is known: why it failed, or None (also on
    a CPU build of torch, where none was started)."""
    import torch

    if torch.version.cuda is None:
        return None
    from dormant.engines.native.cuda.start import early_context_error

    error = early_context_error()
    return None if error is None else f"{type(error).__name__}: {error}"


def _preload_tokenizers(sources: list[str]) -> None:
    from dormant.engines.native.core.tokenizer_load import preload

    preload(sources)  # a worker that loads one of them takes its tokenizer (tokenizer_load.py)


def _image_dir(model_dir: Path, engine_args: dict[str, Any]) -> Path:
    from dormant.engines.native.core.config import EngineConfig
    from dormant.store.images import image_dir_for

    config = EngineConfig.from_args(model_dir, engine_args)
    return image_dir_for(model_dir, config.dtype, config.device)


ENGINE = EngineSpec(
    name="native",
    check_args=check_engine_args,
    may_use_gpu=_may_use_gpu,
    prepare=_prepare,
    load=_load,
    context_error=_context_error,
    preload_tokenizers=_preload_tokenizers,
    image_dir=_image_dir,
    # the worker's import phase: torch, the engine loop and transformers' modeling code (~3 s)
    import_modules=("torch", "transformers", "dormant.engines.native.core.async_engine",
                    "dormant.engines.native.core.llm_engine"),
    preload_modules=(
        # the GPU path's modules, imported lazily by the first forward otherwise: triton alone is
        # ~0.4 s, and with the page cache dropped its files queued behind the image's O_DIRECT
        # reads and stalled a restore's first graph capture for 10 s (bench/README.md, "Restore: cold page cache")
        "dormant.engines.native.cuda.runner", "dormant.engines.native.cuda.start",
        "dormant.engines.native.cuda.compact_decoder", "dormant.engines.native.cuda.arena",
        "dormant.engines.native.core.engine_image", "dormant.engines.native.cuda.arena_copier",
        "dormant.engines.native.cuda.pinned", "dormant.engines.native.kernels.triton_ops",
        "dormant.engines.native.kernels.triton_attention", "dormant.engines.native.kernels.triton_fp8",
    ),
)
