"""The machine's figures behind the placement policy: each pool's budget, and each model's
footprint before it has run (issue 10). Torch-free: GPUs are found with `nvidia-smi`.

Defaults, when dormant.yaml leaves a budget out:
    gpu_memory   the device's memory less GPU_RESERVE_BYTES (the standby worker's CUDA
                 context, and memory the driver keeps)
    host_memory  HOST_SHARE of RAM: the OS, the gateway and the page cache (which makes a
                 hibernated model's restore fast) keep the rest
    disk         what engine images may take: the store's images plus the free space of its
                 filesystem, less DISK_RESERVE_BYTES, at most DISK_SHARE of the filesystem (the
                 filesystem's size alone promised 126 GiB on the H200 where 40 were free, and
                 images failed with ENOSPC)

The disk is the one pool that others share: files of other processes take and give back its
free space while the gateway runs. So the disk budget is read again at each of the placer's
looks (StoreDisk), not once at start, and a configured one is capped by what the disk can hold
now (on the H200 a 44.7 GiB budget taken at start no longer fit, and every image write failed
with ENOSPC while unused images of other models stayed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dormant.config import ModelSpec, ServerConfig, Size
from dormant.lifecycle.placement import Limits
from dormant.sizes import GiB

GPU_RESERVE_BYTES = 2 * GiB
HOST_SHARE = 0.6
DISK_SHARE = 0.5
DISK_RESERVE_BYTES = 4 * GiB  # left free for logs, downloads and what else writes there
# per worker beyond weights and KV: on a GPU the CUDA context, activations and graphs; on the
# CPU the interpreter, torch and the tokenizer (what an asleep CPU worker still holds)
GPU_OVERHEAD_BYTES = 2 * GiB
# vLLM beside its weights and KV cache: two processes' CUDA contexts (1.8 GiB asleep on the
# H200), its CUDA graphs and the activations of its profile run
VLLM_OVERHEAD_BYTES = 4 * GiB
CPU_OVERHEAD_BYTES = 300 * 2**20
# the KV allotment of a model that shares its GPU and names none (Qwen3-8B: ~28k tokens)
SHARED_GPU_KV_BYTES = 4 * GiB
CPU_DEFAULT_KV_TOKENS = 8192  # the native engine's own CPU default
UNKNOWN_WEIGHTS_BYTES = 1 * GiB


def gpu_memory() -> dict[str, int]:
    """Total memory of each visible GPU, {"cuda:0": bytes}; {} without nvidia-smi or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    sizes = [int(line.strip()) * 2**20 for line in out.splitlines() if line.strip().isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # indices as the workers will see them
        sizes = sizes[:len([v for v in visible.split(",") if v.strip()])]
    return {f"cuda:{i}": size for i, size in enumerate(sizes)}


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _resolve(size: Size, whole: int, default: int) -> int:
    if size.bytes is not None:
        return size.bytes
    if size.share is not None:
        return int(whole * size.share)
    return default


def limits(cfg: ServerConfig, gpus: dict[str, int] | None = None, ram: int | None = None) -> Limits:
    """Each pool's budget in bytes; the CPU device shares the host budget."""
    gpus = gpu_memory() if gpus is None else gpus
    ram = host_memory() if ram is None else ram
    b = cfg.budgets
    device: dict[str, int] = {}
    keys: dict[str, str] = {"cpu": "budgets.host_memory"}
    for name, total in gpus.items():
        size = b.gpu_memory_per_device.get(name, b.gpu_memory)
        device[name] = _resolve(size, total, max(0, total - GPU_RESERVE_BYTES))
        keys[name] = f"budgets.gpu_memory.{name}" if name in b.gpu_memory_per_device else "budgets.gpu_memory"
    host = _resolve(b.host_memory, ram, int(ram * HOST_SHARE))
    device["cpu"] = host
    store = cfg.store_path()
    store.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(store)
    disk = disk_budget(b.disk, usage.total, usage.free, _tree_bytes(store / "images"))
    return Limits(device=device, host=host, disk=disk, keys=keys, memory=dict(gpus))


def disk_budget(size: Size, total: int, free: int, images: int) -> int:
    """What engine images may take, from the filesystem's figures of the moment: `budgets.disk`
    as configured, else the default; either way no more than the images hold plus the free
    space, less DISK_RESERVE_BYTES (a budget the disk cannot hold ends in ENOSPC)."""
    default = default_disk_budget(total, free, images)
    return min(_resolve(size, total, default), max(0, images + free - DISK_RESERVE_BYTES))


def default_disk_budget(total: int, free: int, images: int) -> int:
    return max(0, min(int(total * DISK_SHARE), images + free - DISK_RESERVE_BYTES))


class StoreDisk:
    """The store's filesystem as the placer reads it at each look. `usage` gives its (total,
    free) bytes now: one statvfs, cheap after every transition (a test hands its own)."""

    def __init__(self, size: Size, usage: Callable[[], tuple[int, int]]) -> None:
        self.size = size  # budgets.disk as configured
        self._usage = usage

    @classmethod
    def of(cls, cfg: ServerConfig) -> StoreDisk:
        store = cfg.store_path()

        def usage() -> tuple[int, int]:
            figures = shutil.disk_usage(store)
            return figures.total, figures.free

        return cls(cfg.budgets.disk, usage)

    def budget(self, images: int) -> int:
        """The disk budget now, `images` being the bytes the images the placer knows hold (those
        it does not know, of another run or another server, are files like any other)."""
        total, free = self._usage()
        return disk_budget(self.size, total, free, images)

    def room(self) -> int:
        """What a new image may take now: the free space less DISK_RESERVE_BYTES."""
        return max(0, self._usage()[1] - DISK_RESERVE_BYTES)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # deleted while walked
    return total


def candidate_devices(spec: ModelSpec, limits: Limits) -> tuple[str, ...]:
    """Where the model may run: its `device`, else the GPUs (the CPU when there are none, or
    for an engine that computes on the CPU only)."""
    from dormant.engines.base import get_engine

    if spec.device is not None:
        return (spec.device,)
    if spec.engine_args.get("device") == "cpu" or get_engine(spec.engine).cpu_only:
        return ("cpu",)
    gpus = tuple(d for d in limits.device if d.startswith("cuda:"))
    return gpus or ("cpu",)


def keeps_backup(spec: ModelSpec, device: str) -> bool:
    """Whether the replica pins a host copy of its weights while it runs: the native engine on
    a GPU does unless told not to (engine_args backup_weights), so that sleep is one copy into
    memory pinned beforehand (DESIGN.md: pin once, early)."""
    return device != "cpu" and spec.engine == "native" and spec.engine_args.get("backup_weights", True) is not False


def with_default_kv(spec: ModelSpec, shares_gpu: bool) -> ModelSpec:
    """A native model that shares a GPU and names no KV size gets SHARED_GPU_KV_BYTES, not
    the engine's 90 % of the free memory (issue 10: the first model took 105 GiB and the others
    failed). Alone, it keeps the engine's own sizing: a large cache."""
    if spec.engine != "native" or not shares_gpu or spec.engine_args.get("device") == "cpu":
        return spec
    if any(k in spec.engine_args for k in ("kv_cache_memory", "kv_cache_tokens", "num_kv_blocks")):
        return spec
    return replace(spec, engine_args={**spec.engine_args, "kv_cache_memory": SHARED_GPU_KV_BYTES})


def estimate(spec: ModelSpec, device: str, budget: int, store_root: Path,
             device_memory: int | None = None) -> tuple[int, int]:
    """(bytes on the device while running, bytes in host RAM while asleep), before the model
    has run: the engine's own figure where it has one (llama.cpp: the GGUF and its KV cache;
    vLLM: its share of the device's whole memory, `device_memory`), else its weights
    (safetensors sizes; fp32 twice over on the CPU) plus the KV allotment plus a worker's
    overhead. A model alone on its GPU with no allotment takes the budget."""
    footprint = _engine_footprint(spec, store_root)
    if footprint is not None:
        return footprint
    folder = _model_folder(spec.source, store_root)
    weights = _weights_bytes(folder)
    on_cpu = device == "cpu"
    args = spec.engine_args
    if spec.engine == "vllm" and not on_cpu:
        flags = {k.replace("_", "-"): v for k, v in args.items()}
        return _vllm_footprint(flags, weights, budget, device_memory or budget + GPU_RESERVE_BYTES), weights
    if "kv_cache_memory" in args:
        kv = int(args["kv_cache_memory"])
    elif "kv_cache_tokens" in args or on_cpu:
        kv = int(args.get("kv_cache_tokens", CPU_DEFAULT_KV_TOKENS)) * _kv_token_bytes(folder, 4 if on_cpu else 2)
    else:
        return budget, weights  # the engine sizes its cache to the device
    if on_cpu:
        return _cpu_weights_bytes(folder, weights) + kv + CPU_OVERHEAD_BYTES, CPU_OVERHEAD_BYTES
    return weights + kv + GPU_OVERHEAD_BYTES, weights


def writes_image(spec: ModelSpec) -> bool:
    """Whether a start from the model's files writes an engine image as soon as it has loaded
    them (the native engine, unless engine_args backup_weights is false)."""
    from dormant.engines.base import get_engine

    return get_engine(spec.engine).writes_image and spec.engine_args.get("backup_weights", True) is not False


def image_bytes(spec: ModelSpec, device: str, store_root: Path) -> int:
    """What its engine image will take on disk, before the model has run: its weights as the
    engine holds them (safetensors sizes; on the CPU the "mixed" dtype's two copies)."""
    folder = _model_folder(spec.source, store_root)
    weights = _weights_bytes(folder)
    return _cpu_weights_bytes(folder, weights) if device == "cpu" else weights


def _cpu_weights_bytes(folder: Path | None, weights: int) -> int:
    """The "mixed" dtype keeps fp32 weights plus a bf16 copy: 1.5x fp32, 3x a bf16 checkpoint."""
    return int((1.5 if _checkpoint_dtype(folder) == "float32" else 3.0) * weights)


def _vllm_footprint(flags: dict, weights: int, budget: int, device_memory: int) -> int:
    """What a vLLM replica takes on its GPU: weights plus --kv-cache-memory-bytes where given
    (vLLM then ignores the utilization), else --gpu-memory-utilization (0.9 by default) of the
    device's whole memory."""
    if "kv-cache-memory-bytes" in flags:
        return weights + int(flags["kv-cache-memory-bytes"]) + VLLM_OVERHEAD_BYTES
    share = float(flags.get("gpu-memory-utilization", 0.9))
    return min(budget, int(share * device_memory))


def _engine_footprint(spec: ModelSpec, store_root: Path) -> tuple[int, int] | None:
    from dormant.engines.base import get_engine
    from dormant.store.models import local_gguf

    engine = get_engine(spec.engine)
    if engine.memory_footprint is None:
        return None
    path = local_gguf(spec.source, store_root) if engine.reads_gguf else _model_folder(spec.source, store_root)
    if path is None:
        return None
    try:
        return engine.memory_footprint(path, dict(spec.engine_args))
    except (OSError, ValueError):  # an unreadable file: the generic estimate, and the start says why
        return None


def _model_folder(source: str, store_root: Path) -> Path | None:
    from dormant.store.models import SourceNotFound, parse_source

    try:
        found = parse_source(source, store_root)
    except SourceNotFound:
        return None
    return found.folder if found.folder is not None and (found.folder / "config.json").is_file() else None


def _weights_bytes(folder: Path | None) -> int:
    if folder is None:
        return UNKNOWN_WEIGHTS_BYTES
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else UNKNOWN_WEIGHTS_BYTES


def _checkpoint_dtype(folder: Path | None) -> str | None:
    """"float32" when the first safetensors file's first tensor is F32 (read from its header)."""
    files = sorted(folder.glob("*.safetensors")) if folder else []
    try:
        with open(files[0], "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (IndexError, OSError, ValueError):
        return None
    dtypes = [v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return "float32" if dtypes and dtypes[0] == "F32" else None


def _kv_token_bytes(folder: Path | None, itemsize: int) -> int:
    try:
        hf = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        hf = {}
    hf = hf.get("text_config", hf)
    heads = hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim") or hf.get("hidden_size", 4096) // heads
    return 2 * hf.get("num_hidden_layers", 32) * (hf.get("num_key_value_heads") or heads) * head_dim * itemsize
