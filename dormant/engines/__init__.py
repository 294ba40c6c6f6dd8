"""Engines behind the worker contract. A registry, not an if-chain: name -> factory.

A factory takes (model_dir, engine_args dict) and returns (async engine, tokenizer,
max_model_len). Only the worker imports this (it pulls in torch).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable


def _native(model_dir: Path, engine_args: dict[str, Any]):
    from transformers import AutoTokenizer

    from dormant.engines.native.async_engine import AsyncLLMEngine
    from dormant.engines.native.config import EngineConfig
    from dormant.engines.native.llm_engine import LLMEngine

    config = EngineConfig.from_args(model_dir, engine_args)
    # the tokenizer (a 10 MB tokenizer.json for Qwen3) loads beside the model, off the start's path
    with ThreadPoolExecutor(1, thread_name_prefix="dormant-tokenizer") as pool:
        tokenizer_loaded = pool.submit(AutoTokenizer.from_pretrained, model_dir)
        engine = LLMEngine(config)
        tokenizer = tokenizer_loaded.result()
    if tokenizer.eos_token_id is not None:
        engine.add_eos_token_ids({tokenizer.eos_token_id})
    return AsyncLLMEngine(engine), tokenizer, config.max_model_len


ENGINES: dict[str, Callable] = {"native": _native}


def create_engine(name: str, model_dir: Path, engine_args: dict[str, Any]):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model_dir, engine_args)
