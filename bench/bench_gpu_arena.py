"""GPU arena sleep/wake against the host->GPU copy floor (DESIGN.md §4a-c).

A microbench of one mechanism, so it imports the module it measures (the native engine's
CudaArena) rather than going through the engine. Runs on a CUDA machine (bench/README.md,
"GPU arena", has the command). In one process it measures the two ceilings (pinned host<->GPU copy, device copy), then for arenas the
size of Qwen3-0.6B and Qwen3-8B bf16 weights filled with random bytes: pin time, sleep, GPU
memory held while asleep, wake (whole, and pipelined: time to first chunk / to all chunks),
the floor bytes / pinned H2D bandwidth and wake / floor; and a CUDA graph captured before the
first sleep replayed after 3 sleep/wake cycles. Prints a table; writes
bench/results/gpu-arena/latest.json (or --out). Exits 1 if a round trip or the replay is wrong.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from report import no_anchor, print_figures, result_path, vs_floor, write  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def qwen3_weight_bytes(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied,
                       bytes_per_param=2):
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)        # q, o, k, v
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden + 2 * head_dim                             # + q_norm, k_norm
    params = layers * (attn + mlp + norms) + vocab * hidden * (1 if tied else 2) + hidden
    return params * bytes_per_param


# Shapes from the models' config.json (/work/shared/models/qwen3-8b.json for the 8B).
SIZES = {
    "qwen3-0.6b": qwen3_weight_bytes(1024, 3072, 28, 16, 8, 128, 151936, tied=True),
    "qwen3-8b": qwen3_weight_bytes(4096, 12288, 36, 32, 8, 128, 151936, tied=False),
}


def timed_copy(dst, src, reps=5):
    """Median seconds of dst.copy_(src), timed with events on the current stream."""
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def ceilings(nbytes):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    h2d = timed_copy(dev, host)
    d2h = timed_copy(host, dev)
    d2d = timed_copy(dev2, dev)
    assert torch.equal(dev2, dev)
    del host, dev, dev2
    torch.cuda.empty_cache()
    return {"copy_bytes": nbytes, "h2d_pinned_GBps": nbytes / h2d / 1e9,
            "d2h_pinned_GBps": nbytes / d2h / 1e9, "d2d_GBps_read_plus_write": 2 * nbytes / d2d / 1e9}


def free_bytes():
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def bench_arena(name, nbytes, h2d_GBps, cycles, chunk_bytes):
    from dormant.engines.native.cuda.arena import CudaArena

    torch.cuda.empty_cache()
    free0 = free_bytes()
    t = time.perf_counter()
    arena = CudaArena(nbytes, chunk_bytes=chunk_bytes)
    create_s = time.perf_counter() - t
    free1 = free_bytes()
    t = time.perf_counter()
    arena.allocate_host_backup(nbytes)
    pin_s = time.perf_counter() - t
    base = arena.tensor(0, (nbytes,), torch.uint8)
    base.random_(0, 256)
    ref = base.clone()
    ptr = base.data_ptr()
    r = {"name": name, "bytes": nbytes, "arena_bytes": arena.nbytes, "chunks": len(arena.chunks),
         "chunk_bytes": arena.chunks[0][1], "create_s": create_s, "pin_host_backup_s": pin_s,
         "arena_gpu_bytes": free0 - free1}
    sleep_s, wake_s, held, ttfc, pipe_all, pipe_ret = [], [], [], [], [], []
    exact = True
    for i in range(2 * cycles + 1):  # cycle 0 warms up; then whole wakes, then pipelined
        pipelined = i > cycles
        free_awake = free_bytes()
        t = time.perf_counter()
        arena.sleep(keep_bytes=nbytes)
        s = time.perf_counter() - t
        free_asleep = free_bytes()
        t = time.perf_counter()
        events = arena.wake(pipelined=pipelined)
        returned = time.perf_counter() - t
        if pipelined:
            events[0].synchronize()
            first = time.perf_counter() - t
            events[-1].synchronize()
        w = time.perf_counter() - t
        torch.cuda.current_stream().wait_event(events[-1])
        exact &= bool(torch.equal(base, ref)) and base.data_ptr() == ptr
        if i == 0:
            continue
        sleep_s.append(s)
        held.append(arena.nbytes - (free_asleep - free_awake))
        if pipelined:
            ttfc.append(first)
            pipe_all.append(w)
            pipe_ret.append(returned)
        else:
            wake_s.append(w)
    floor = nbytes / (h2d_GBps * 1e9)
    # What the whole process holds on the GPU while asleep, apart from torch's own caching
    # allocator (which here holds the reference copy): the context, cuBLAS, the arena's rest.
    arena.sleep(keep_bytes=0)
    total = torch.cuda.mem_get_info()[1]
    process_asleep = total - free_bytes() - torch.cuda.memory_reserved()
    arena.close()
    del ref
    torch.cuda.empty_cache()
    med = statistics.median
    r.update({
        "sleep_s": med(sleep_s), "wake_s": med(wake_s),
        "pipelined_wake_first_chunk_s": med(ttfc), "pipelined_wake_all_s": med(pipe_all),
        "pipelined_wake_returns_s": med(pipe_ret),
        "sleep_s_all": sleep_s, "wake_s_all": wake_s,
        "arena_gpu_bytes_held_asleep": max(held),
        "process_gpu_bytes_asleep_excl_torch_allocator": process_asleep,
        "floor_s": floor, "wake_over_floor": med(wake_s) / floor,
        "wake_GBps": nbytes / med(wake_s) / 1e9, "sleep_GBps": nbytes / med(sleep_s) / 1e9,
        "bit_exact_every_cycle": exact,
    })
    return r


def graph_replay_check(cycles=3):
    """A matmul reading arena tensors, captured before the first sleep, replayed after."""
    from dormant.engines.native.cuda.arena import CudaArena

    n = 4096
    with CudaArena(256 * MiB, chunk_bytes=64 * MiB) as arena:
        arena.allocate_host_backup()
        a = arena.tensor(0, (n, n), torch.bfloat16)
        b = arena.tensor(n * n * 2, (n, n), torch.bfloat16)
        c = arena.tensor(128 * MiB, (n, n), torch.bfloat16)   # past the kept bytes
        a.copy_(torch.randn(n, n, device="cuda"))
        b.copy_(torch.randn(n, n, device="cuda"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.matmul(a, b, out=c)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.matmul(a, b, out=c)
        graph.replay()
        expected = c.clone()
        ref = a.double() @ b.double()
        for _ in range(cycles):
            arena.sleep(keep_bytes=2 * n * n * 2)
            arena.wake(pipelined=True)
            torch.cuda.synchronize()
        c.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        rel = float((c.double() - ref).norm() / ref.norm())
        return {"cycles": cycles, "no_nan": not bool(torch.isnan(c).any()),
                "equal_to_pre_sleep_replay": bool(torch.equal(c, expected)),
                "rel_err_vs_fp64": rel, "ok": bool(torch.equal(c, expected)) and rel < 1e-2}


def machine():
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        driver = None
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu_total_bytes": torch.cuda.mem_get_info()[1], "cpus": os.cpu_count()}


def figures(result):
    """Each arena's sleep and wake beside the copy floor at the bus's measured speed."""
    ceil, out = result["ceilings"], {}
    for r in result["arenas"]:
        name = f"{r['name']}, {r['chunk_bytes'] // MiB} MiB chunks"
        wake_goal = f"<= {result['goals']['wake_8b_s']:.2f} s" if r["name"] == "qwen3-8b" else None
        out[f"{name}: wake, s"] = vs_floor(r["wake_s"], "pinned host->GPU copy of the same bytes, s", r["floor_s"],
                                           goal=wake_goal)
        out[f"{name}: sleep, s"] = vs_floor(r["sleep_s"], "pinned GPU->host copy of the same bytes, s",
                                            r["bytes"] / (ceil["d2h_pinned_GBps"] * 1e9))
        out[f"{name}: process GPU memory asleep, MiB"] = no_anchor(
            r["process_gpu_bytes_asleep_excl_torch_allocator"] / MiB, goal="<= 1024 MiB")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON path (default bench/results/gpu-arena/latest.json)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--chunk-mib", default="256",
                   help="comma-separated chunk sizes; each size is benched with each")
    p.add_argument("--copy-gib", type=float, default=4.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_arena needs a CUDA GPU")

    torch.cuda.init()
    torch.empty(1, device="cuda")
    arenas = []
    result = {"bench": "gpu-arena", "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": machine(), "arenas": arenas,
              "goals": {"wake_8b_s": 0.40, "asleep_held_bytes": GiB,
                        "design_16GiB_sleep_s": 0.32, "design_16GiB_wake_s": 0.34}}

    out = result_path("gpu-arena", args.out)

    def save():  # after every stage, so a crash later keeps what was measured
        result["figures"] = figures(result)
        write(out, result)

    ceil = result["ceilings"] = ceilings(int(args.copy_gib * GiB))
    save()
    for n in args.sizes.split(","):
        for chunk_mib in args.chunk_mib.split(","):
            arenas.append(bench_arena(n, SIZES[n], ceil["h2d_pinned_GBps"], args.cycles,
                                      int(chunk_mib) * MiB))
            save()
    graph = result["graph_replay"] = graph_replay_check()
    save()
    print_figures(result["figures"])

    print(f"\n{result['machine']['gpu']}, driver {result['machine']['driver']}, "
          f"torch {torch.__version__}")
    print(f"pinned H2D {ceil['h2d_pinned_GBps']:.1f} GB/s, D2H {ceil['d2h_pinned_GBps']:.1f} GB/s, "
          f"device copy {ceil['d2d_GBps_read_plus_write']:.0f} GB/s (read+write)")
    hdr = ("arena", "GB", "chunk MiB", "pin s", "sleep s", "wake s", "floor s", "wake/floor", "1st chunk s",
           "pipe all s", "held asleep MiB", "proc asleep MiB", "exact")
    print(" | ".join(hdr))
    for r in arenas:
        print(" | ".join([
            r["name"], f"{r['bytes'] / 1e9:.2f}", str(r["chunk_bytes"] // MiB), f"{r['pin_host_backup_s']:.2f}",
            f"{r['sleep_s']:.3f}", f"{r['wake_s']:.3f}", f"{r['floor_s']:.3f}",
            f"{r['wake_over_floor']:.2f}", f"{r['pipelined_wake_first_chunk_s']:.4f}",
            f"{r['pipelined_wake_all_s']:.3f}", f"{r['arena_gpu_bytes_held_asleep'] / MiB:.0f}",
            f"{r['process_gpu_bytes_asleep_excl_torch_allocator'] / MiB:.0f}",
            str(r["bit_exact_every_cycle"])]))
    print(f"graph replay after {graph['cycles']} sleep/wake cycles: ok={graph['ok']} "
          f"(rel err vs fp64 {graph['rel_err_vs_fp64']:.1e})")
    ok = graph["ok"] and all(r["bit_exact_every_cycle"] for r in arenas)
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
