"""Placement settings in dormant.yaml (issue 10): budgets, kv_cache_memory, pin, preload,
device; each bad value names its key. Also the budgets' defaults and the footprint estimate
(lifecycle/budgets.py), and the native engine's KV cache sized from kv_cache_memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dormant.config import ConfigError, Size, load_config
from dormant.engines.native.core.config import EngineConfig
from dormant.lifecycle import budgets
from dormant.lifecycle.placement import Limits
from dormant.sizes import GiB, parse_bytes

pytestmark = pytest.mark.timeout(30)


def load(tmp_path: Path, text: str):
    path = tmp_path / "dormant.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("raw,n", [("8GiB", 8 * GiB), ("500MB", 500 * 10**6), (1024, 1024), ("1.5 GiB", int(1.5 * GiB))])
def test_parse_bytes(raw, n):
    assert parse_bytes(raw, "k") == n


def test_budgets_and_model_placement_keys(tmp_path):
    cfg = load(tmp_path, "budgets:\n  gpu_memory: {cuda:1: 60GiB}\n  host_memory: 50%\n  disk: 100GiB\n"
                         "preload: [b]\n"
                         "models:\n  a: {source: builtin:smollm2, kv_cache_memory: 2GiB, pin: true, device: cpu,"
                         " preload: true}\n  b: {source: builtin:smollm2, kv_cache_memory: 4096 tokens}\n")
    assert cfg.budgets.gpu_memory_per_device == {"cuda:1": Size(bytes=60 * GiB)}
    assert cfg.budgets.host_memory == Size(share=0.5) and cfg.budgets.disk == Size(bytes=100 * GiB)
    a, b = cfg.models
    assert a.engine_args == {"kv_cache_memory": 2 * GiB, "device": "cpu"} and a.pin and a.device == "cpu"
    assert b.engine_args == {"kv_cache_tokens": 4096} and b.kv_cache_tokens == 4096
    assert cfg.preload == ("b", "a")


@pytest.mark.parametrize("text,key", [
    ("budgets:\n  host_memory: plenty\n", "budgets.host_memory"),
    ("budgets:\n  disk: 150%\n", "budgets.disk"),
    ("budgets:\n  gpu_memory: {gpu0: 1GiB}\n", "budgets.gpu_memory.gpu0"),
    ("budgets:\n  vram: 1GiB\n", "budgets: unknown key"),
    ("preload: [nope]\n", "preload: 'nope'"),
    ("models:\n  m: {source: builtin:smollm2, kv_cache_memory: lots}\n", "models.m.kv_cache_memory"),
    ("models:\n  m: {source: builtin:smollm2, kv_cache_memory: 0 tokens}\n", "models.m.kv_cache_memory"),
    ("models:\n  m: {source: builtin:smollm2, device: gpu}\n", "models.m.device"),
    ("models:\n  m: {source: builtin:smollm2, pin: yes please}\n", "models.m.pin"),
    ("models:\n  m: {source: builtin:smollm2, kv_cache_memory: 1GiB, engine_args: {num_kv_blocks: 8}}\n",
     "models.m.kv_cache_memory"),
    ("models:\n  m: {source: builtin:smollm2, device: cpu, engine_args: {device: cuda}}\n", "models.m.device"),
])
def test_bad_placement_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load(tmp_path, text)


def test_default_budgets_leave_room(tmp_path):
    cfg = load(tmp_path, f"store: {tmp_path}\n")
    limits = budgets.limits(cfg, gpus={"cuda:0": 140 * GiB, "cuda:1": 80 * GiB}, ram=100 * GiB)
    assert limits.device["cuda:0"] == 140 * GiB - budgets.GPU_RESERVE_BYTES
    assert limits.host == limits.device["cpu"] == 60 * GiB
    assert 0 < limits.disk


def test_default_disk_budget_is_what_images_can_really_take(tmp_path):
    G = GiB
    # the H200's 64 GiB disk, 40 free: not half its size (32 would not fit beside the models)
    assert budgets.default_disk_budget(total=252 * G, free=40 * G, images=0) == 40 * G - budgets.DISK_RESERVE_BYTES
    # images already held count as room (they are the budget's own), half the disk at most
    assert budgets.default_disk_budget(total=100 * G, free=10 * G, images=20 * G) == 30 * G - budgets.DISK_RESERVE_BYTES
    assert budgets.default_disk_budget(total=100 * G, free=90 * G, images=0) == 50 * G
    assert budgets.default_disk_budget(total=100 * G, free=1 * G, images=0) == 0
    # the store's images are measured
    cfg = load(tmp_path, f"store: {tmp_path}\n")
    image = tmp_path / "images" / "m-0123"
    image.mkdir(parents=True)
    (image / "data").write_bytes(b"x" * 2**20)
    usage = shutil.disk_usage(tmp_path)
    limits = budgets.limits(cfg, gpus={}, ram=100 * GiB)
    expected = budgets.default_disk_budget(usage.total, usage.free, 2**20)
    assert abs(limits.disk - expected) < 64 * 2**20  # the filesystem's free space moves a little


def test_the_disk_budget_follows_the_free_space_and_caps_a_configured_one():
    G = GiB
    reserve = budgets.DISK_RESERVE_BYTES
    # the H200: 44.7 GiB at start; other files then took 30 GiB of the free space
    assert budgets.disk_budget(Size(), total=64 * G, free=40 * G, images=10 * G) == 32 * G
    assert budgets.disk_budget(Size(), total=64 * G, free=10 * G, images=10 * G) == 20 * G - reserve
    # a configured budget holds while the disk can hold it, and is capped where it cannot
    assert budgets.disk_budget(Size(bytes=30 * G), total=64 * G, free=40 * G, images=10 * G) == 30 * G
    assert budgets.disk_budget(Size(bytes=30 * G), total=64 * G, free=10 * G, images=10 * G) == 20 * G - reserve
    assert budgets.disk_budget(Size(share=0.9), total=100 * G, free=20 * G, images=0) == 20 * G - reserve
    assert budgets.disk_budget(Size(bytes=30 * G), total=64 * G, free=1 * G, images=0) == 0


def test_the_store_disk_is_read_again_at_each_look():
    G = GiB
    free = [40 * G]
    disk = budgets.StoreDisk(Size(), lambda: (64 * G, free[0]))
    assert disk.budget(images=10 * G) == 32 * G and disk.room() == 40 * G - budgets.DISK_RESERVE_BYTES
    free[0] = 10 * G  # other files came
    assert disk.budget(images=10 * G) == 20 * G - budgets.DISK_RESERVE_BYTES
    assert disk.room() == 10 * G - budgets.DISK_RESERVE_BYTES
    free[0] = 1 * G
    assert disk.room() == 0


def test_models_sharing_a_gpu_get_a_kv_allotment_a_lone_one_keeps_the_engine_sizing(tmp_path):
    # engine native named: the allotment is its own (auto serves the builtin with llama.cpp where
    # there is no GPU, as here)
    cfg = load(tmp_path, "models:\n  a: {source: builtin:smollm2, engine: native}\n  b: builtin:smollm2\n")
    a = cfg.models[0]
    assert budgets.with_default_kv(a, shares_gpu=True).engine_args == {"kv_cache_memory": budgets.SHARED_GPU_KV_BYTES}
    assert budgets.with_default_kv(a, shares_gpu=False).engine_args == {}


def fake_model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256,
        "max_position_embeddings": 4096}))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1000], "data_offsets": [0, 2000]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(2000))
    return folder


def test_estimate_is_weights_plus_kv_plus_a_worker(tmp_path):
    folder = fake_model(tmp_path)
    cfg = load(tmp_path, f"models:\n  m: {{source: {folder}, kv_cache_memory: 1GiB}}\n")
    weights = (folder / "model.safetensors").stat().st_size
    running, asleep = budgets.estimate(cfg.models[0], "cuda:0", 100 * GiB, tmp_path)
    assert running == weights + GiB + budgets.GPU_OVERHEAD_BYTES and asleep == weights
    lone = load(tmp_path, f"models:\n  m: {{source: {folder}}}\n").models[0]
    assert budgets.estimate(lone, "cuda:0", 100 * GiB, tmp_path)[0] == 100 * GiB  # the engine sizes to the GPU
    on_cpu, _ = budgets.estimate(lone, "cpu", 100 * GiB, tmp_path)
    kv = 8192 * 2 * 4 * 2 * 32 * 4  # tokens x K,V x layers x kv heads x head_dim x fp32
    assert on_cpu == 3 * weights + kv + budgets.CPU_OVERHEAD_BYTES  # bf16 checkpoint: fp32 + bf16 copy


def test_a_cold_starts_image_is_its_weights_as_the_engine_holds_them(tmp_path):
    folder = fake_model(tmp_path)
    weights = (folder / "model.safetensors").stat().st_size

    def spec(line: str):
        return load(tmp_path, f"models:\n  m: {{source: {folder}, {line}}}\n").models[0]

    native = spec("engine: native")
    assert budgets.writes_image(native)
    assert budgets.image_bytes(native, "cuda:0", tmp_path) == weights
    assert budgets.image_bytes(native, "cpu", tmp_path) == 3 * weights  # bf16 checkpoint: fp32 + bf16 copy
    assert not budgets.writes_image(spec("engine: native, engine_args: {backup_weights: false}"))
    assert not budgets.writes_image(spec("engine: vllm"))


def test_a_vllm_model_is_sized_from_its_kv_cache_or_its_share_of_the_gpu(tmp_path):
    """vLLM takes gpu_memory_utilization of the device's memory (0.9 by default), or
    weights plus kv_cache_memory_bytes where that is given; asleep (level 1), its weights in RAM."""
    folder = fake_model(tmp_path)
    weights = (folder / "model.safetensors").stat().st_size

    device_memory = 140 * GiB  # what vLLM takes its share of; dormant's budget is 100 GiB of it

    def estimate(args: str) -> tuple[int, int]:
        spec = load(tmp_path, f"models:\n  m: {{source: {folder}, engine: vllm, engine_args: {args}}}\n").models[0]
        return budgets.estimate(spec, "cuda:0", 100 * GiB, tmp_path, device_memory)

    assert estimate("{gpu_memory_utilization: 0.5}") == (int(0.5 * device_memory), weights)
    assert estimate("{gpu_memory_utilization: 0.4}")[0] == int(0.4 * device_memory)
    assert estimate("{}")[0] == 100 * GiB  # 0.9 of the device: never beyond the budget
    assert estimate("{kv_cache_memory_bytes: 1073741824, gpu_memory_utilization: 0.4}") == (
        weights + GiB + budgets.VLLM_OVERHEAD_BYTES, weights)


def test_native_engine_sizes_its_kv_cache_from_kv_cache_memory(tmp_path):
    folder = fake_model(tmp_path)
    block = 2 * 4 * 16 * 2 * 32 * 4  # K,V x layers x block_size x kv heads x head_dim x fp32
    config = EngineConfig.from_args(folder, {"device": "cpu", "kv_cache_memory": 10 * block + 5})
    assert config.kv_block_bytes() == block and config.num_kv_blocks == 10
    assert config.max_model_len == 160  # a context longer than the whole cache cannot run


def test_a_llamacpp_model_is_sized_from_its_gguf_and_kv_cache(tmp_path):
    """The embedded default on llama.cpp: the GGUF (mmap'd) plus a KV stream of max_model_len
    f16 cells per sequence, not a dequantized folder three times over (issue 10 / 14)."""
    from dormant.store.gguf_import import builtin_gguf_path

    gguf = builtin_gguf_path()
    kv_token = 30 * 3 * (64 + 64) * 2  # SmolLM2-135M: layers x KV heads x (key + value) x f16
    for text, tokens in (("{source: builtin:smollm2, engine: llamacpp}", 2048 * 8),
                         ("{source: builtin:smollm2, engine: llamacpp, engine_args: {max_num_seqs: 2, max_model_len: 1024}}", 1024 * 2)):
        spec = load(tmp_path, f"models:\n  m: {text}\n").models[0]
        running, asleep = budgets.estimate(spec, "cpu", 100 * GiB, tmp_path)
        overhead = running - gguf.stat().st_size - tokens * kv_token
        kept = 32 << 20  # asleep_prefix_cache_bytes: the recent prompts' KV that sleep keeps
        assert 0 < overhead == asleep - kept < GiB, (running, asleep)


def test_a_llamacpp_model_is_placed_on_the_cpu_of_a_gpu_machine(tmp_path):
    limits = Limits(device={"cuda:0": 100 * GiB, "cpu": 60 * GiB}, host=60 * GiB, disk=100 * GiB)
    cfg = load(tmp_path, "models:\n  a: {source: builtin:smollm2, engine: llamacpp}\n"
                         f"  b: {{source: {fake_model(tmp_path)}, engine: native}}\n")
    assert [budgets.candidate_devices(spec, limits) for spec in cfg.models] == [("cpu",), ("cuda:0",)]
