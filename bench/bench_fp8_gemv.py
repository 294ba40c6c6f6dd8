"""Decode's FP8 GEMMs at 1-16 rows (issue 12): fp8_gemv's candidate configs beside today's
fused_fp8_gemm and bf16 F.linear (the anchor) on Qwen3-8B's four decode GEMMs, both formats.

    python bench/bench_fp8_gemv.py          # GPU machine; bash bench/gpu_session.sh fp8-gemv

Why: the FP8 8B model decoded at 152 tok/s, below bf16's 181, though it reads 9.4 GB a step
instead of 16.4: fused_fp8_gemm's few wide programs keep too few bytes in flight to read the
weight at HBM speed. The goal (>= 1.7x bf16's decode) needs these GEMMs near ~4 TB/s.

Each figure is the time of one GEMM inside a CUDA graph of CALLS calls (launch overhead left
out, as in the engine's decode graphs), the weight rotated among copies filling > 2 x the
50 MB L2 so every call reads HBM, as 36 layers' distinct weights do. Per (format, shape):
CANDIDATES at 1 row, then the best 3 of them, the best tl.dot one and gemv_config's current
choice at 2, 4, 8, 16 rows. It prints microseconds, weight GB/s and the ratio to bf16, then
GEMV_TABLE's lines (triton_fp8.py) for the best of each (None where fused_fp8_gemm won).
JSON to bench/results/fp8-gemv/latest.json (or --out); saved after each shape, and the sweep
stops at --deadline seconds, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import print_figures, result_path, vs_anchor, write  # noqa: E402

CALLS, REPLAYS = 20, 10
L2_FILL = 256e6  # bytes of weight copies rotated through: > 2 x the H200's 50 MB L2
MS = (1, 2, 4, 8, 16)
# name: (kernel, block_n, block_k, programs aimed at (split_k follows; 1: unsplit), warps, stages);
# kernel "fma" / "dot": _fp8_gemv_kernel's two ways, "a16": the weight-only one (one row only)
CANDIDATES = {
    "fma-n16-k512-p512": ("fma", 16, 512, 512, 4, 3),
    "fma-n16-k512-p1024": ("fma", 16, 512, 1024, 4, 3),
    "fma-n8-k512-p512": ("fma", 8, 512, 512, 4, 3),
    "fma-n32-k512-p512": ("fma", 32, 512, 512, 4, 3),
    "fma-n16-k1024-p512-w8": ("fma", 16, 1024, 512, 8, 2),
    "fma-n16-k256-p256-s4": ("fma", 16, 256, 256, 4, 4),
    "fma-n32-k256-nosplit": ("fma", 32, 256, 1, 4, 3),
    "dot-n32-k256-p512": ("dot", 32, 256, 512, 4, 3),
    "dot-n64-k512-p512": ("dot", 64, 512, 512, 4, 3),
    "dot-n32-k512-nosplit-s4": ("dot", 32, 512, 1, 4, 4),
    "a16-n16-k512-p512": ("a16", 16, 512, 512, 4, 3),
    "a16-n16-k512-p1024": ("a16", 16, 512, 1024, 4, 3),
    "a16-n16-k256-p1024": ("a16", 16, 256, 1024, 4, 3),
    "a16-n16-k256-p2048": ("a16", 16, 256, 2048, 4, 3),
    "a16-n8-k512-p1024": ("a16", 8, 512, 1024, 4, 3),
    "a16-n4-k1024-p1024": ("a16", 4, 1024, 1024, 4, 3),
    "a16-n32-k256-p512": ("a16", 32, 256, 512, 4, 3),
    "a16-n32-k512-p512-w8": ("a16", 32, 512, 512, 8, 3),
    "a16-n16-k1024-p512-w8": ("a16", 16, 1024, 512, 8, 2),
}


def decode_shapes(config_path: Path) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of compact_decoder's four GEMMs (q/k/v and gate/up fused)."""
    cfg = json.loads(config_path.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {"qkv": (q + 2 * kv, hidden), "o_proj": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def graph_us(calls) -> float:
    """Microseconds per call of calls[i % len(calls)], CALLS of them in one CUDA graph."""
    import torch

    for fn in calls:  # eager first: Triton compiles, split-K tickets are made, cuBLAS picks
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            calls[i % len(calls)]()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS)


def check(call, reference, against: str) -> None:
    """A candidate's output against its reference: fused_fp8_gemm's (same fp8 products, fp32
    sums in another order, bf16 out) or, for the weight-only kernel, x times the dequantized
    weight in fp32. Raises when any element is off by more than bf16's rounding allows, and
    twice in a row (split-K's tickets must have reset themselves)."""
    for _ in range(2):
        got = call().float()
        err = ((got - reference).abs() / (reference.abs() + 1e-2 * reference.abs().max())).max().item()
        if not err <= 2e-2:  # also catches NaN
            raise AssertionError(f"output differs from {against}: relative error {err:.3g}")


def gemv_config_of(name: str, n: int, k: int, m: int):
    from dormant.engines.native.kernels.triton_fp8 import GemvConfig, split_for

    kernel, block_n, block_k, programs, warps, stages = CANDIDATES[name]
    if k % block_k or (kernel == "a16" and m != 1):
        return None
    block_m = 16 if kernel == "dot" else 1 << (m - 1).bit_length()
    tiles = -(-n // block_n) * -(-m // block_m)
    return GemvConfig(kernel == "dot", block_n, block_k, split_for(tiles, k, block_k, programs), warps, stages,
                      a16=kernel == "a16")


def measure_shape(fmt, n: int, k: int, ms, result: dict, deadline: float) -> None:
    """Every row count of one (format, shape) into result[str(m)]."""
    import torch

    from dormant.engines.native.core.quantization import dequantize_weight, quantize_weight
    from dormant.engines.native.kernels.triton_fp8 import fp8_gemv, fused_fp8_gemm, gemv_config, guess_gemv_config

    per_token = fmt.block is None
    w = torch.randn(n, k, device="cuda") * 0.02
    wq, ws = quantize_weight(w, fmt)
    fp8_bytes = wq.numel() + ws.numel() * 4
    copies = max(2, int(L2_FILL // fp8_bytes) + 1)
    fp8 = [(wq.clone(), ws.clone()) for _ in range(copies)]
    bf16 = [w.to(torch.bfloat16) for _ in range(max(2, int(L2_FILL // (2 * n * k)) + 1))]
    del w
    ranking: list[str] = []
    for m in ms:
        first = m == ms[0]
        if time.monotonic() > deadline:
            print(f"  deadline: M={m} and after skipped", flush=True)
            return
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        entry = {"bf16_us": graph_us([lambda b=b: torch.nn.functional.linear(x, b) for b in bf16]),
                 "fused_us": graph_us([lambda q=q, s=s: fused_fp8_gemm(x, q, s, per_token) for q, s in fp8]),
                 "candidates": {}}
        reference = fused_fp8_gemm(x, *fp8[0], per_token).float()
        dequantized = x.float() @ dequantize_weight(*fp8[0], fmt).t()
        names = list(CANDIDATES) if first else \
            [r for r in ranking if CANDIDATES[r][0] != "a16"][:3] + [r for r in ranking if CANDIDATES[r][0] == "dot"][:1]
        configs = {name: gemv_config_of(name, n, k, m) for name in dict.fromkeys(names)}
        configs["current"] = gemv_config(m, n, k, per_token) or guess_gemv_config(m, n, k)
        for name, config in configs.items():
            if config is None:
                continue
            against = ("x . dequantized weight", dequantized) if config.a16 else ("fused_fp8_gemm's", reference)
            try:
                check(lambda c=config: fp8_gemv(x, *fp8[0], per_token, c), against[1], against[0])
                us = graph_us([lambda q=q, s=s, c=config: fp8_gemv(x, q, s, per_token, c) for q, s in fp8])
                check(lambda c=config: fp8_gemv(x, *fp8[0], per_token, c), against[1], against[0])  # after the replays
            except Exception as e:  # noqa: BLE001 - a candidate that fails to compile (or is wrong) is recorded and skipped
                entry["candidates"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            entry["candidates"][name] = {"us": us, "config": dataclasses.asdict(config)}
        timed = {name: c["us"] for name, c in entry["candidates"].items() if "us" in c}
        if first:
            ranking = sorted((name for name in timed if name != "current"), key=timed.get)
        best = min(timed, key=timed.get) if timed else None
        entry["best"] = None
        if best is not None and timed[best] < entry["fused_us"]:
            entry["best"] = {"name": best, "us": timed[best], **entry["candidates"][best]}
        best_us = min([entry["fused_us"], *timed.values()])
        entry["best_us"] = best_us
        entry["best_gbps"] = fp8_bytes / best_us / 1e3
        entry["bf16_gbps"] = 2 * n * k / entry["bf16_us"] / 1e3
        entry["vs_bf16"] = entry["bf16_us"] / best_us
        result[str(m)] = entry
        print(f"  M={m:2d}  bf16 {entry['bf16_us']:7.1f} us {entry['bf16_gbps']:6.0f} GB/s | fused "
              f"{entry['fused_us']:7.1f} us {fp8_bytes / entry['fused_us'] / 1e3:6.0f} GB/s "
              f"{entry['bf16_us'] / entry['fused_us']:4.2f}x", flush=True)
        for name, us in sorted(timed.items(), key=lambda kv: kv[1]):
            print(f"        {name:26s} {us:7.1f} us {fp8_bytes / us / 1e3:6.0f} GB/s {entry['bf16_us'] / us:4.2f}x"
                  f"{'  <- best' if entry['best'] and entry['best']['name'] == name else ''}", flush=True)
        for name, c in entry["candidates"].items():
            if "error" in c:
                print(f"        {name:26s} failed: {c['error'][:160]}", flush=True)


def table_entries(runs: dict, shapes: dict) -> dict:
    """gemv_table's entries: the best config per (format, N, K, rows), None where fused won."""
    from dormant.engines.native.kernels.gemv_table import GemvConfig

    out = {}
    for kind, by_shape in runs.items():
        for shape, by_m in by_shape.items():
            n, k = shapes[shape]
            for m, entry in by_m.items():
                best = entry.get("best")
                out[(kind, n, k, int(m))] = None if best is None else GemvConfig(**best["config"])
    return out


def table_lines(runs: dict, shapes: dict) -> list[str]:
    """GEMV_TABLE's entries for triton_fp8.py: the best config, None where fused won."""
    lines = []
    for kind, by_shape in runs.items():
        for shape, by_m in by_shape.items():
            n, k = shapes[shape]
            for m, entry in by_m.items():
                best = entry.get("best")
                value = "None" if best is None else "GemvConfig({use_dot}, {block_n}, {block_k}, {split_k}, " \
                    "{num_warps}, {num_stages}, a16={a16})".format(**{"a16": False, **best["config"]})
                lines.append(f'    ("{kind}", {n}, {k}, {m}): {value},  # {shape}: {entry["best_us"]:.1f} us, '
                             f'{entry["vs_bf16"]:.2f}x bf16')
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"), help="model config.json (shapes)")
    p.add_argument("--formats", default="block,channel", help="comma-separated: block, channel")
    p.add_argument("--shapes", default="qkv,o_proj,gate_up,down", help="comma-separated: qkv, o_proj, gate_up, down")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="row counts; the first is the full sweep's")
    p.add_argument("--deadline", type=float, default=170.0, help="seconds after which no new row count starts")
    p.add_argument("--write-table", action="store_true",
                   help="write the best configs into this GPU's file in dormant/engines/native/kernels/gemv_configs/ "
                        "(fp8_linear serves from it); entries this run did not measure are kept")
    p.add_argument("--out", help="JSON path (default bench/results/fp8-gemv/latest.json)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemv needs a CUDA GPU (torch.cuda.is_available() is False)")
    from dormant.engines.native.core.quantization import BLOCK_FP8, CHANNEL_FP8
    from dormant.engines.native.kernels.gemv_table import device_table, table_path, write_table

    started = time.monotonic()
    deadline = started + args.deadline
    formats = {"block": BLOCK_FP8, "channel": CHANNEL_FP8}
    shapes = {name: nk for name, nk in decode_shapes(Path(args.config)).items() if name in args.shapes.split(",")}
    ms = [int(m) for m in args.ms.split(",")]
    out = result_path("fp8-gemv", args.out)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python3", *sys.argv]),
              "machine": f"{torch.cuda.get_device_name(0)}; {platform.platform()}; torch {torch.__version__}",
              "calls_per_graph": CALLS, "replays": REPLAYS, "l2_fill_bytes": L2_FILL, "shapes": shapes,
              "candidates": CANDIDATES, "runs": {}, "figures": {}}
    for kind in args.formats.split(","):
        result["runs"][kind] = {}
        for shape, (n, k) in shapes.items():
            print(f"{kind} {shape} N={n} K={k}", flush=True)
            by_m = result["runs"][kind][shape] = {}
            measure_shape(formats[kind], n, k, ms, by_m, deadline)
            torch.cuda.empty_cache()
            write(out, result)
        for m in (ms[0], ms[-1]):  # a decode step's four GEMMs, ours and bf16's
            entries = [result["runs"][kind][s].get(str(m)) for s in shapes]
            if entries and all(entries):
                result["figures"][f"{kind}_m{m}_gemms_us"] = vs_anchor(
                    sum(e["best_us"] for e in entries), "bf16 F.linear, same GEMMs", sum(e["bf16_us"] for e in entries),
                    False, goal=">= 1.7x")
                result["figures"][f"{kind}_m{m}_fused_gemms_us"] = vs_anchor(
                    sum(e["fused_us"] for e in entries), "bf16 F.linear, same GEMMs",
                    sum(e["bf16_us"] for e in entries), False)
    result["table"] = table_lines(result["runs"], shapes)
    if args.write_table:
        name = torch.cuda.get_device_name(0)  # what this run measured replaces the file's entries; the rest stay
        measured, kept = table_entries(result["runs"], shapes), device_table(name)
        when = f"{result['date']} {result['command']}"
        if set(kept) - set(measured):
            when += f" (rows {args.ms}); the other entries: {json.loads(table_path(name).read_text())['measured']}"
        result["table_file"] = str(write_table(name, {**kept, **measured}, when))
        print(f"wrote {result['table_file']}")
    result["seconds"] = time.monotonic() - started
    write(out, result)
    print("\nGEMV_TABLE entries (triton_fp8.py):")
    print("\n".join(result["table"]))
    print()
    print_figures(result["figures"])
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
