"""The engine image on a GPU: a restore gives identical tokens, a corrupt image is rebuilt, deferred graphs."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from dormant.store.images import EngineImage

ROOT = Path(__file__).resolve().parents[2]
GPU_FACTS = {"cuda": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3", "driver": 12080}


# ---- on the GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_small(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import make_random_model

    return make_random_model(ROOT / "bench/configs/qwen3-0.6b.json", tmp_path_factory.mktemp("qwen3-0.6b"))


def step_all(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt, stepped as the async engine drives it (generate() would
    capture every deferred graph first)."""
    from dormant.engines.base import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        out[f"r{i}"] = []
        engine.add_request(f"r{i}", p, params)
    while engine.has_unfinished:
        for rid, output in engine.step():
            out[rid].extend(output.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def start(model_dir) -> tuple[str, list[int], EngineImage, dict]:
    """One engine start: its weights' source, greedy tokens, image (written) and phases."""
    from dormant.engines.base import SamplingParams
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    config = EngineConfig.from_args(model_dir, {"device": "cuda", "kv_cache_tokens": 8192, "max_num_seqs": 4,
                                                "cuda_graph_batch_sizes": [1, 2, 4]})
    engine = LLMEngine(config)
    runner = engine.model_runner
    prompts = [[11, 2024, 7, 99, 31337], [5] * 40]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    runner.save_image()
    result = runner.weights_source, outs, runner.image.image, dict(runner.startup_phases)
    runner.arena.close()
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return result


@pytest.mark.timeout(600)
def test_gpu_image_restores_identical_tokens_and_a_corrupt_one_is_rebuilt(qwen3_small, tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    source, expected, image, phases = start(qwen3_small)
    assert source == "safetensors" and image.exists()
    assert {"cuda_context", "weight_load", "graph_capture"} <= set(phases)

    source, out, _, phases = start(qwen3_small)
    assert (source, out) == ("image", expected)

    from dormant.engines.native.cuda import start as cuda_start

    cuda_start.start_cuda_context()  # as a worker does: the staging pinned beside the start
    source, out, _, _ = start(qwen3_small)
    assert (source, out) == ("image", expected) and cuda_start.take_early_context() is None

    with open(image.data_path, "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(image.data_path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    source, out, _, _ = start(qwen3_small)
    assert (source, out) == ("safetensors", expected)
    source, out, _, _ = start(qwen3_small)  # the previous start rebuilt it
    assert (source, out) == ("image", expected)


@contextlib.contextmanager
def small_engine(model_dir):
    """A native engine on the GPU (4 sequences, graphs of 1, 2, 4), closed and its memory
    freed afterwards."""
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    config = EngineConfig.from_args(model_dir, {"device": "cuda", "kv_cache_tokens": 8192, "max_num_seqs": 4,
                                                "cuda_graph_batch_sizes": [1, 2, 4]})
    engine = LLMEngine(config)
    try:
        yield engine
    finally:
        engine.model_runner.arena.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def idle_until_done(runner) -> None:
    """Call idle_work as the engine loop would, until it has nothing left."""
    calls = 0
    while (wait := runner.idle_work()) is not None:
        time.sleep(wait)
        calls += 1
        assert calls < 10_000


def assert_sleep_reuses_the_backup(engine, prompts, first) -> None:
    """The backup holds the weights already; sleep -> wake gives the tokens of `first`."""
    runner = engine.model_runner
    assert not runner.arena.host_backup_pending and runner.arena.backup_holds == runner.weights_bytes
    engine.sleep(1)
    engine.wake_up()
    assert step_all(engine, prompts, max_tokens=12) == first


PROMPTS = [[11, 2024, 7, 99, 31337], [5] * 40]


@pytest.mark.timeout(600)
def test_gpu_a_restored_engine_fills_its_backup_when_idle_then_sleeps_without_a_copy(qwen3_small, tmp_path,
                                                                                     monkeypatch):
    from dormant.engines.native.cuda import runner as cuda_runner

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    start(qwen3_small)  # writes the image
    with small_engine(qwen3_small) as engine:
        runner = engine.model_runner
        assert runner.weights_source == "image" and runner.arena.backup_holds == 0
        first = step_all(engine, PROMPTS, max_tokens=12)
        monkeypatch.setattr(cuda_runner, "IDLE_GRACE_S", 0.0)
        idle_until_done(runner)
        torch.cuda.synchronize()
        assert_sleep_reuses_the_backup(engine, PROMPTS, first)


@pytest.mark.timeout(600)
def test_gpu_a_full_disk_still_fills_the_backup_after_a_start(qwen3_small, tmp_path, monkeypatch):
    """No image (the disk refuses the reservation), yet the start's thread pins the backup and
    copies the weights into it: the first sleep copies nothing, the wake gives the same tokens."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with small_engine(qwen3_small) as engine:
        runner = engine.model_runner
        first = step_all(engine, PROMPTS, max_tokens=12)
        runner._image_write.join()
        assert not runner.image.is_usable()
        assert_sleep_reuses_the_backup(engine, PROMPTS, first)


@pytest.mark.timeout(600)
def test_gpu_idle_work_captures_deferred_graphs_and_pins_without_touching_the_kv(qwen3_small, tmp_path, monkeypatch):
    """Start-up work deferred to idle time (the larger decode graphs): nothing before the
    first step; then done by idle_work; the graph warm-up does not overwrite cached KV (same
    tokens from the prefix cache after it); sleep/wake after it. The pinned host backup is
    the image write's: pinned, the weights copied into it, so the sleep copies nothing."""
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine
    from dormant.engines.native.cuda import runner as cuda_runner

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    config = EngineConfig.from_args(qwen3_small, {"device": "cuda", "kv_cache_tokens": 8192, "max_num_seqs": 16,
                                                "defer_graphs_above": 8})
    engine = LLMEngine(config)
    runner = engine.model_runner
    try:
        assert runner.graphs.sizes == [1, 2, 4, 8] and runner.graphs.pending == [16]
        runner._image_write.join()
        assert not runner.arena.host_backup_pending and runner.arena.backup_holds == runner.weights_bytes
        assert runner.image.is_usable()
        assert runner.idle_work() is None  # nothing before the first served step

        def run(prompts):
            return step_all(engine, prompts, max_tokens=12)

        prompts = [[11, 2024, 7, 99] * 10 + [5], [3] * 37]  # full blocks: prefix-cached
        first = run(prompts)
        cached = run(prompts)  # from the prefix cache
        wait = runner.idle_work()
        assert wait is not None and 0 < wait <= cuda_runner.IDLE_GRACE_S  # the grace
        monkeypatch.setattr(cuda_runner, "IDLE_GRACE_S", 0.0)
        idle_until_done(runner)
        assert runner.graphs.sizes == [1, 2, 4, 8, 16] and not runner.graphs.pending
        assert not runner.arena.host_backup_pending
        hits = runner.num_processed_tokens
        assert run(prompts) == cached  # cached KV intact after the deferred capture's warm-up
        assert runner.num_processed_tokens - hits < sum(map(len, prompts)) + 2 * 12  # cache hits
        many = run([[i + 1, 17, 4] for i in range(12)])  # 12 decodes: the deferred graph of 16
        engine.sleep(1)
        engine.wake_up()
        assert run(prompts) == first
        assert run([[i + 1, 17, 4] for i in range(12)]) == many
    finally:
        runner.arena.close()
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.timeout(600)
def test_gpu_a_step_never_captures_it_pads_or_runs_eagerly(qwen3_small, tmp_path, monkeypatch):
    """A decode batch whose graph size is pending replays the smallest captured graph that
    holds it, padded, or runs eagerly when none does; it never captures (issue 12: a burst
    waited on a capture at each new size). Tokens equal those of the graphs captured later."""
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    config = EngineConfig.from_args(qwen3_small, {"device": "cuda", "kv_cache_tokens": 4096, "max_num_seqs": 8,
                                                "defer_graphs_above": 2, "backup_weights": False})
    engine = LLMEngine(config)
    runner = engine.model_runner
    try:
        assert runner.graphs.sizes == [1, 2] and runner.graphs.pending == [8, 4]

        def run(prompts):
            return step_all(engine, prompts, max_tokens=8)

        prompts = [[i + 3, 40, 41, 42, 9] for i in range(3)]
        eager = run(prompts)  # 3 decodes, no graph holds them: eager
        assert runner.graphs.sizes == [1, 2] and runner.graphs.pending == [8, 4]
        assert [len(t) for t in eager] == [8, 8, 8]
        runner._capture_pending_graph()  # 8: the 3 decodes pad up to it
        padded = run(prompts)
        assert runner.graphs.sizes == [1, 2, 8] and runner.graphs.pending == [4]
        runner.capture_pending_graphs()
        assert runner.graphs.sizes == [1, 2, 4, 8] and run(prompts) == padded  # the graph of 4
    finally:
        runner.arena.close()
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
