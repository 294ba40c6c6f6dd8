"""A log line per Triton kernel variant the worker compiles (or loads from Triton's disk cache)
and its time. A compile on the serving path stalls every request of that step: before each
vector of an eager step started 16-byte aligned (core/step_plan.py), the first burst after a
cold start compiled variants of the prefill kernels for seconds (issue 12).

Imports triton: only the CUDA path calls it.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("dormant.engine")

_installed = False


def log_triton_compiles() -> bool:
    """Hook Triton's JIT (its knobs, Triton >= 3.4): one INFO line per variant made, with its
    name and seconds. False where this Triton has no such hooks. Hooks already set are kept
    and called first."""
    global _installed
    if _installed:
        return True
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = knobs.runtime
    if not (hasattr(runtime, "jit_cache_hook") and hasattr(runtime, "jit_post_compile_hook")):
        return False
    before_hook, after_hook = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started = threading.local()  # a stack per thread: a compile runs on the thread that launched it

    def before(**kwargs):
        skip = before_hook(**kwargs) if before_hook is not None else False
        if not skip:
            started.__dict__.setdefault("stack", []).append(time.perf_counter())
        return skip

    def after(**kwargs):
        if after_hook is not None:
            after_hook(**kwargs)
        stack = started.__dict__.get("stack")
        seconds = time.perf_counter() - stack.pop() if stack else float("nan")
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(kwargs.get("repr", "?")).split("[", 1)[0]
        log.info("triton kernel %s made in %.3f s%s", name, seconds,
                 " (warm-up)" if kwargs.get("is_manual_warmup") else "")

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    _installed = True
    return True
