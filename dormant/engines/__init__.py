"""Engines behind the worker contract. A registry, not an if-chain: name -> factory.

A factory takes (model_dir, engine_args dict) and returns (async engine, tokenizer,
max_model_len); `prepare` starts what can run before it. Only the worker imports this (it
pulls in torch).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("dormant.worker")


def _native(model_dir: Path, engine_args: dict[str, Any]):
    from dormant.engines.native.async_engine import AsyncLLMEngine
    from dormant.engines.native.config import EngineConfig
    from dormant.engines.native.llm_engine import LLMEngine
    from dormant.engines.native.tokenizer_load import load_tokenizer as load

    config = EngineConfig.from_args(model_dir, engine_args)

    def load_tokenizer():
        started = time.perf_counter()
        tokenizer = load(model_dir)
        return tokenizer, time.perf_counter() - started

    # the tokenizer (a 10 MB tokenizer.json for Qwen3) loads beside the model, off the start's
    # path; where the runner says (its parse holds the GIL, bench/NOTES-hibernate.md)
    with ThreadPoolExecutor(1, thread_name_prefix="dormant-tokenizer") as pool:
        loading: list[Future] = []
        engine = LLMEngine(config, beside_load=lambda: loading.append(pool.submit(load_tokenizer)))
        if not loading:  # a runner that never called it
            loading.append(pool.submit(load_tokenizer))
        waited = time.perf_counter()
        tokenizer, own = loading[0].result()
    log.info("tokenizer loaded beside the model in %.2f s (waited %.2f s for it)", own, time.perf_counter() - waited)
    if tokenizer.eos_token_id is not None:
        engine.add_eos_token_ids({tokenizer.eos_token_id})
    return AsyncLLMEngine(engine), tokenizer, config.max_model_len


def _native_prepare(engine_args: dict[str, Any]) -> None:
    """On a GPU, or where one may be ("auto" with a CUDA build of torch), the context starts in
    the background. Not through torch.cuda.is_available(): its cuInit (0.2 s) would run here,
    holding the GIL, before anything else of the start (bench/NOTES-hibernate.md). Where there
    is no GPU after all, that thread fails and nothing waits for it."""
    if engine_args.get("device", "auto") == "cpu":
        return
    import torch

    if torch.version.cuda is not None:
        from dormant.engines.native import gpu_start

        gpu_start.start_cuda_context()


ENGINES: dict[str, Callable] = {"native": _native}
PREPARE: dict[str, Callable] = {"native": _native_prepare}


def prepare(name: str, engine_args: dict[str, Any]) -> None:
    """Start, in the background, what the engine can do before its model loads (the worker
    calls it first: on a GPU, the CUDA context). Unknown names are left to create_engine."""
    if name in PREPARE:
        PREPARE[name](engine_args)


def create_engine(name: str, model_dir: Path, engine_args: dict[str, Any]):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model_dir, engine_args)
