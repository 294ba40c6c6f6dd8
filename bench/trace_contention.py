"""Which first-time CUDA calls wait for other threads' copies? A diagnostic for the restore's
overlap of graph capture with the weight stream (bench/NOTES-hibernate.md).

    python3 bench/trace_contention.py [--gap-ms 4]

16 threads copy 8 MiB pinned blocks to the GPU, each on its own stream, waiting on an event
after each (as a restore does; --gap-ms between copies stands in for the disk), while the main
thread times its first cuBLAS GEMM, first Triton kernels, a new 1 GiB segment and a graph
capture; then the same again with the copiers stopped. No JSON.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(name: str, fn) -> None:
    import torch

    started = time.perf_counter()
    fn()
    torch.cuda.current_stream().synchronize()
    print(f"  {name:<34} {1000 * (time.perf_counter() - started):8.1f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gap-ms", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    from dormant.worker.preload import preload

    preload()
    import torch

    from dormant.engines.native import triton_ops

    started = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    print(f"context {time.perf_counter() - started:.3f} s")
    dest = torch.empty(16 * 8 << 20, dtype=torch.uint8, device="cuda")
    stop = threading.Event()
    copies = [0]
    deadline = [0.0]  # copiers stop by themselves then: a call that waits for them shows it

    def copier(i: int) -> None:
        src = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)
        stream = torch.cuda.Stream()
        while not stop.is_set() and time.perf_counter() < deadline[0]:
            with torch.cuda.stream(stream):
                dest[i * (8 << 20):(i + 1) * (8 << 20)].copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            event.synchronize()
            copies[0] += 1
            if args.gap_ms:
                time.sleep(args.gap_ms / 1000)

    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(4096, device="cuda", dtype=torch.bfloat16)

    def capture() -> None:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            torch.mm(x, w)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    for phase, threads in (("with 16 copiers", 16), ("alone", 0)):
        stop.clear()
        deadline[0] = time.perf_counter() + args.seconds
        workers = [threading.Thread(target=copier, args=(i,), daemon=True) for i in range(threads)]
        for t in workers:
            t.start()
        time.sleep(0.5 if threads else 0)
        before = copies[0]
        t0 = time.perf_counter()
        print(phase, flush=True)
        timed("cuBLAS GEMM (first in phase)", lambda: torch.mm(x, w))
        timed("cuBLAS GEMM (again)", lambda: torch.mm(x, w))
        if threads:
            timed("Triton add_rms_norm (first)", lambda: triton_ops.add_rms_norm_cuda(x, r, nw, 1e-6))
            timed("Triton add_rms_norm (again)", lambda: triton_ops.add_rms_norm_cuda(x, r, nw, 1e-6))
        else:
            timed("Triton silu_and_mul (first)", lambda: triton_ops.silu_and_mul_cuda(torch.cat([x, r], 1)))
            timed("Triton silu_and_mul (again)", lambda: triton_ops.silu_and_mul_cuda(torch.cat([x, r], 1)))
        timed("new 1 GiB segment", lambda: torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(0))
        timed("graph capture of one GEMM", capture)
        timed("graph capture again", capture)
        x = x[:64].contiguous()  # new shapes for the next phase's "first" calls
        r = r[:64].contiguous()
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in workers:
            t.join()
        print(f"  copies meanwhile: {copies[0] - before} ({(copies[0] - before) * 8 / 1024 / max(elapsed, 1e-9):.1f} GiB/s)")


if __name__ == "__main__":
    main()
