"""The Triton compile log's hooks, on a stand-in for `triton.knobs` (no Triton without a GPU
here; tests/gpu/test_gpu_engine.py runs the real one): a line per variant, hooks set before
kept, and a hook that skips a compile still skips it."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from dormant.engines.native.kernels import compile_log


@pytest.fixture
def knobs(monkeypatch):
    runtime = types.SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    triton = types.ModuleType("triton")
    triton.knobs = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setattr(compile_log, "_installed", False)
    return runtime


def _compile(runtime, name: str) -> bool:
    """What Triton's JIT does around a compile: the cache hook (True: skip), then the post hook."""
    fn = types.SimpleNamespace(name=name)
    if runtime.jit_cache_hook(key=name, repr=f"{name}[num_warps=4](...)", fn=fn, compile={},
                              is_manual_warmup=False, already_compiled=False):
        return False
    runtime.jit_post_compile_hook(key=name, repr=f"{name}[num_warps=4](...)", fn=fn, compile={},
                                  is_manual_warmup=False, already_compiled=False)
    return True


@pytest.mark.timeout(30)
def test_each_variant_made_is_logged_and_earlier_hooks_still_run(knobs, caplog):
    seen = []
    knobs.jit_cache_hook = lambda **kw: seen.append(("before", kw["key"])) or kw["key"] == "skipped"
    knobs.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["key"]))
    assert compile_log.log_triton_compiles()
    with caplog.at_level(logging.INFO, logger="dormant.engine"):
        assert _compile(knobs, "_paged_prefill_kernel")
        assert not _compile(knobs, "skipped")  # the earlier hook's answer stands
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("triton kernel _paged_prefill_kernel made in ")
    assert seen == [("before", "_paged_prefill_kernel"), ("after", "_paged_prefill_kernel"), ("before", "skipped")]
    assert compile_log.log_triton_compiles()  # once per process: not hooked twice
    assert knobs.jit_post_compile_hook is not None


@pytest.mark.timeout(30)
def test_a_triton_without_the_hooks_is_left_alone(monkeypatch):
    triton = types.ModuleType("triton")
    triton.knobs = types.SimpleNamespace(runtime=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setattr(compile_log, "_installed", False)
    assert not compile_log.log_triton_compiles()
