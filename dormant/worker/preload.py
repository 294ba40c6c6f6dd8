"""What the zygote imports and computes before it forks workers (worker/zygote.py): everything a
worker needs before it loads a model, CUDA left untouched (a forked CUDA context is unusable).

    preload()        # ~3-5 s on the GPU machine (DESIGN.md section 4e), once per gateway
"""

from __future__ import annotations

import os


def preload() -> None:
    """Everything a worker imports before loading a model, CUDA left untouched."""
    # Set before torch allocates (see worker/__main__.py): 4096-aligned host arenas.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import importlib

    import fastapi  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import dormant.store.models  # noqa: F401
    import dormant.worker.server  # noqa: F401
    from dormant.engines.base import engine_names, get_engine

    for family in ("llama", "qwen2", "qwen3", "mistral"):  # AutoModel imports these lazily
        try:
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            pass
    # Each engine's modules (engines/base.py: EngineSpec.preload_modules), then the libraries
    # its GPU path imports lazily at the first forward: triton alone is ~0.4 s, and with the
    # page cache dropped its files queued behind the image's O_DIRECT reads and stalled a
    # restore's first graph capture for 10 s (bench/README.md, "Restore: cold page cache"). None of them touches
    # CUDA at import (a forked child could not use it).
    engine_modules = [m for name in engine_names() for spec in [get_engine(name)]
                      for m in (*spec.import_modules, *spec.preload_modules)]
    for name in (*engine_modules, "dormant.store.image_reader",
                 "triton", "triton.language",
                 "triton.compiler.compiler", "triton.runtime.jit", "triton.backends.nvidia.driver",
                 "triton.compiler.code_generator", "triton.language.semantic", "triton.experimental.gluon",
                 "triton.tools.tensor_descriptor", "cuda.bindings.driver",
                 # what uvicorn's Config.load() imports when the worker's server starts
                 "uvicorn.protocols.http.auto", "uvicorn.protocols.http.httptools_impl",
                 "uvicorn.protocols.http.h11_impl", "uvicorn.lifespan.on", "uvicorn.loops.auto", "uvloop"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - no triton on CPU-only installs; cuda.bindings without a driver
            pass
    # Triton keys its kernel cache on a hash of its own files, computed once per process at
    # the first kernel launch: 0.39 s of a restore's first forward (~400 files read and
    # hashed, bench/README.md, "Restore: first uses"), and with the page cache dropped those reads queued
    # behind the image's. Computed here, the forked workers inherit it.
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        pass
    else:
        triton_key()
    # Two more of Triton's per-process facts, cached by it and asked for at the first launch:
    # `ldconfig -p` for libcuda's folder and `file` on the interpreter for the platform, each a
    # subprocess (~15 ms apiece). Neither touches CUDA.
    for module, name in (("triton.backends.nvidia.driver", "libcuda_dirs"), ("triton.runtime.build", "platform_key")):
        try:
            getattr(importlib.import_module(module), name)()
        except Exception:  # noqa: BLE001 - absent in this Triton version, or no libcuda
            pass
