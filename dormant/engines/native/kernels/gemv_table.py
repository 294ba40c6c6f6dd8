"""Launch shapes of the FP8 decode GEMV (triton_fp8._fp8_gemv_kernel), and which one serves
each of a model's GEMMs on a given GPU: only shapes measured faster than fused_fp8_gemm on
that GPU's model (bench/bench_fp8_gemv.py --write-table), as vLLM keeps its tuned kernel
configs per device name. A GPU without a file here runs fused_fp8_gemm for every decode GEMM.

    gemv_configs/<device name, non-alphanumerics as _>.json
        {"device": "NVIDIA H200", "measured": "<date> <command>",
         "entries": [{"format": "block", "n": 6144, "k": 4096, "m": 1,
                      "config": {"use_dot": false, "block_n": 16, ...} or null}, ...]}

`m` is the step's rows rounded up to a power of 2; a null config: fused_fp8_gemm was faster.
Pure Python (no torch, no triton): the tests and the zygote import it freely.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("gemv_configs")
GEMV_MAX_M = 16  # rows up to which fp8_linear asks gemv_config (above: fused_fp8_gemm)
TARGET_PROGRAMS = 512  # ~4 per SM on the H200's 132: enough bytes in flight to cover HBM latency


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape of the decode GEMV. use_dot: tl.dot on 16-row tiles (fp8 tensor
    cores); else fp32 multiply-adds on next_power_of_2(M) rows, which needs no 16-row padding
    and no 16-wide N but costs ~M FMAs per weight byte: at ~30 GB/s per SM that is compute
    bound from M ~ 4-8, where the dot takes over. a16 (one row only, block_n dividing 128):
    _fp8_gemv_a16_kernel, weight-only, the row's activations not quantized."""

    use_dot: bool
    block_n: int
    block_k: int  # a multiple of 128: the loop's step, read as BLOCK_K / 128 groups
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    a16: bool = False

    def fits(self, k: int) -> bool:
        return k % (self.split_k * self.block_k) == 0


Key = tuple[str, int, int, int]  # (format, N, K, rows rounded up to a power of 2)

# entries that win over the device's file (tests; a config being tried)
GEMV_TABLE: dict[Key, GemvConfig | None] = {}


def key_of(m: int, n: int, k: int, per_token: bool) -> Key:
    return ("channel" if per_token else "block", n, k, 1 << (m - 1).bit_length())


def gemv_config(m: int, n: int, k: int, per_token: bool, device_name: str | None = None) -> GemvConfig | None:
    """The config for an [m, k] x [n, k]^T FP8 GEMM on `device_name`, or None: use
    fused_fp8_gemm (more rows than GEMV_MAX_M, a K the kernel does not take, or no entry)."""
    if m > GEMV_MAX_M or k % 128:
        return None
    key = key_of(m, n, k, per_token)
    if key in GEMV_TABLE:
        return GEMV_TABLE[key]
    return device_table(device_name).get(key) if device_name else None


def split_for(n_tiles: int, k: int, block_k: int, target: int = TARGET_PROGRAMS) -> int:
    """The smallest power-of-2 split of K giving `target` programs, each range whole steps."""
    split = 1
    while n_tiles * split < target and k % (2 * split * block_k) == 0:
        split *= 2
    return split


def guess_gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """The bench's starting point where nothing is measured: FMAs on a strip of 16 rows up to
    4 rows, tl.dot on 32 above; BLOCK_K 512 (16 rows x 512 = 8 KiB a load); K split for ~4
    programs per SM."""
    use_dot = m > 4
    block_n = 32 if use_dot else 16
    block_k = next(b for b in (512, 256, 128) if k % b == 0)
    return GemvConfig(use_dot, block_n, block_k, split_for(-(-n // block_n), k, block_k))


def table_path(device_name: str, folder: Path | None = None) -> Path:
    return (folder or CONFIG_DIR) / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@lru_cache(maxsize=None)
def device_table(device_name: str) -> dict[Key, GemvConfig | None]:
    """The measured entries for `device_name` in CONFIG_DIR ({} without a file)."""
    path = table_path(device_name)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {(e["format"], e["n"], e["k"], e["m"]): None if e["config"] is None else GemvConfig(**e["config"])
            for e in data["entries"]}


def write_table(device_name: str, entries: dict[Key, GemvConfig | None], measured: str,
                folder: Path | None = None) -> Path:
    """Write `entries` as `device_name`'s file (the bench's result); returns its path."""
    path = table_path(device_name, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"format": f, "n": n, "k": k, "m": m, "config": None if c is None else asdict(c)}
            for (f, n, k, m), c in sorted(entries.items())]
    path.write_text(json.dumps({"device": device_name, "measured": measured, "entries": rows}, indent=1) + "\n")
    device_table.cache_clear()
    return path
