"""Ways to pin a host backup (issue 10): seconds per GiB, and how long another thread's CUDA
calls wait meanwhile.

    python bench/bench_pin.py --gib 8          # GPU machine; bash bench/gpu_session.sh pin

Why: in the swap trace every model's first sleep pinned its 15.3 GiB backup there and then (5-22 s),
and a pin call in another thread blocks the engine's CUDA calls for a piece or two
(bench/README.md, "Arena: pinning the host backup"), so today's backup is pinned only while idle.
Each way below pins --gib GiB while the main thread runs a small kernel and a synchronize in a
loop; the figure beside each is the longest the loop waited (its baseline: the loop alone):

    alloc-1      cuMemHostAlloc, 64 MiB pieces, one thread (what the arena does now)
    alloc-4      the same from 4 threads at once
    register-4k  anonymous memory, first touched by torch's CPU threads, then cuMemHostRegister
                 per 1 GiB
    register-2m  the same with MADV_HUGEPAGE (2 MiB pages)
    bounce-2m    no pinning: GPU -> fresh MADV_HUGEPAGE memory through two pinned 64 MiB
                 buffers (what a sleep whose backup is not pinned yet could do instead),
                 then back; the figures beside it are both copies' speeds
    pageable-2m  the same copies as plain cudaMemcpy into and out of pageable memory

Then the pinned host -> GPU copy speed of each way's memory (a registered buffer must copy as
fast as an allocated one). JSON to bench/results/pin/latest.json (or --out).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from report import result_path, write  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
PIECE = 64 * MiB
REGISTER_PIECE = GiB


def check(result):
    from cuda.bindings import driver as cu

    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return values[0] if values else None


class Loop:
    """The main thread's stand-in for an engine: a small kernel and a synchronize, again and
    again, noting the longest one."""

    def __init__(self) -> None:
        import torch

        self.x = torch.zeros(1024, device="cuda")
        self.longest = 0.0
        self.count = 0

    def run_while(self, worker: threading.Thread) -> None:
        import torch

        while worker.is_alive():
            started = time.perf_counter()
            self.x.add_(1)
            torch.cuda.synchronize()
            self.longest = max(self.longest, time.perf_counter() - started)
            self.count += 1


def alloc(nbytes: int, threads: int, kept: list) -> None:
    from cuda.bindings import driver as cu

    pieces = [PIECE] * (nbytes // PIECE)
    lock = threading.Lock()

    def one() -> None:
        check(cu.cuCtxSetCurrent(context))
        while True:
            with lock:
                if not pieces:
                    return
                size = pieces.pop()
            ptr = check(cu.cuMemHostAlloc(size, 0))
            with lock:
                kept.append(("alloc", int(ptr), size))

    context = check(cu.cuCtxGetCurrent())
    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def register(nbytes: int, huge: bool, kept: list) -> None:
    import torch
    from cuda.bindings import driver as cu

    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        buf.madvise(mmap.MADV_HUGEPAGE)
    started = time.perf_counter()
    torch.frombuffer(buf, dtype=torch.uint8).view(-1, 4096)[:, 0].zero_()  # first touch, torch's threads
    kept.append(("touch_s", time.perf_counter() - started, 0))
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    kept.append(("mmap", buf, nbytes))
    for offset in range(0, nbytes, REGISTER_PIECE):
        size = min(REGISTER_PIECE, nbytes - offset)
        check(cu.cuMemHostRegister(address + offset, size, 0))
        kept.append(("registered", address + offset, size))


def copies(nbytes: int, pinned_between: bool, kept: list) -> None:
    """GPU -> fresh pageable (2 MiB pages) memory and back; through two pinned 64 MiB buffers
    (pinned_between) or plain cudaMemcpy. Notes each direction's GB/s in `kept`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    host = torch.frombuffer(buf, dtype=torch.uint8)
    kept.append(("mmap", buf, nbytes))
    stream = torch.cuda.Stream()
    for direction in ("d2h", "h2d"):
        torch.cuda.synchronize()
        started = time.perf_counter()
        if not pinned_between:
            with torch.cuda.stream(stream):
                if direction == "d2h":
                    host.copy_(src)
                else:
                    src.copy_(host)
            stream.synchronize()
        else:
            bounce = [torch.empty(PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            done = [torch.cuda.Event() for _ in range(2)]
            pending: list = [None, None]
            with torch.cuda.stream(stream):
                for k, offset in enumerate(range(0, nbytes, PIECE)):
                    b, n = k % 2, min(PIECE, nbytes - offset)
                    if pending[b] is not None:  # this buffer's last copy must be over
                        done[b].synchronize()
                        if direction == "d2h":
                            o, m = pending[b]
                            host[o:o + m].copy_(bounce[b][:m])
                    if direction == "d2h":
                        bounce[b][:n].copy_(src[offset:offset + n], non_blocking=True)
                        pending[b] = (offset, n)
                    else:
                        bounce[b][:n].copy_(host[offset:offset + n])
                        src[offset:offset + n].copy_(bounce[b][:n], non_blocking=True)
                        pending[b] = (offset, n)
                    done[b].record(stream)
                for b in range(2):
                    if pending[b] is not None:
                        done[b].synchronize()
                        if direction == "d2h":
                            o, m = pending[b]
                            host[o:o + m].copy_(bounce[b][:m])
        kept.append((f"{direction}_gbps", nbytes / (time.perf_counter() - started) / 1e9, 0))
    del host


def h2d_gbps(kept: list) -> float:
    """Host -> GPU copy speed from the first pinned GiB of `kept`."""
    import torch
    from cuda.bindings import driver as cu

    pinned = [(ptr, size) for kind, ptr, size in kept if kind in ("alloc", "registered")]
    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    done = 0
    for ptr, size in pinned:
        n = min(size, GiB - done)
        check(cu.cuMemcpyHtoD(dst.data_ptr() + done, ptr, n))
        done += n
        if done >= GiB:
            break
    torch.cuda.synchronize()
    return done / (time.perf_counter() - started) / 1e9


def release(kept: list) -> None:
    from cuda.bindings import driver as cu

    for kind, ptr, _ in reversed(kept):
        if kind == "alloc":
            check(cu.cuMemFreeHost(ptr))
        elif kind == "registered":
            check(cu.cuMemHostUnregister(ptr))
    for kind, buf, _ in kept:
        if kind == "mmap":
            try:
                buf.close()
            except BufferError:  # a view of it still alive: the collector unmaps it
                pass
    kept.clear()


WAYS = {
    "alloc-1": lambda n, kept: alloc(n, 1, kept),
    "alloc-4": lambda n, kept: alloc(n, 4, kept),
    "register-4k": lambda n, kept: register(n, False, kept),
    "register-2m": lambda n, kept: register(n, True, kept),
    "bounce-2m": lambda n, kept: copies(n, True, kept),
    "pageable-2m": lambda n, kept: copies(n, False, kept),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8.0, help="GiB pinned by each way")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated: " + ", ".join(WAYS))
    p.add_argument("--out", help="JSON path (default bench/results/pin/latest.json)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_pin needs a CUDA GPU (torch.cuda.is_available() is False)")
    nbytes = int(args.gib * GiB) // PIECE * PIECE
    out = result_path("pin", args.out)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python3", *sys.argv]),
              "machine": f"{torch.cuda.get_device_name(0)}; {platform.platform()}; torch {torch.__version__}",
              "gib": nbytes / GiB, "ways": {}}
    from cuda.bindings import driver as cu

    loop = Loop()  # makes torch's context current here
    context = check(cu.cuCtxGetCurrent())
    idle = threading.Thread(target=time.sleep, args=(2.0,))
    idle.start()
    loop.run_while(idle)
    result["loop_alone_longest_s"] = loop.longest
    print(f"loop alone: longest step {loop.longest * 1e3:.2f} ms over {loop.count} steps", flush=True)
    for name in args.ways.split(","):
        kept: list = []
        failed: list = []

        def pin() -> None:
            try:
                check(cu.cuCtxSetCurrent(context))  # torch's context, in this new thread
                WAYS[name](nbytes, kept)
            except Exception as e:  # noqa: BLE001 - recorded and printed as it is
                failed.append(f"{type(e).__name__}: {e}")

        loop = Loop()
        worker = threading.Thread(target=pin)
        started = time.perf_counter()
        worker.start()
        loop.run_while(worker)
        seconds = time.perf_counter() - started
        entry = {"seconds": seconds, "s_per_gib": seconds / (nbytes / GiB), "loop_longest_s": loop.longest,
                 "loop_steps": loop.count}
        entry.update({kind: round(value, 3) for kind, value, _ in kept if kind.endswith(("_s", "_gbps"))})
        kept[:] = [k for k in kept if not k[0].endswith(("_s", "_gbps"))]
        if failed:
            entry["error"] = failed[0]
        elif name.startswith(("alloc", "register")):
            entry["h2d_gbps"] = h2d_gbps(kept)
        release(kept)
        result["ways"][name] = entry
        write(out, result)
        print(f"{name:12s} {json.dumps(entry)}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
