"""What a GPU start pays once per process, measured one thing at a time with nothing beside it.

    python3 bench/trace_first_use.py MODEL_DIR [--top 25]

After the zygote's imports, in this order, each synchronized and timed: the CUDA context (the
driver's calls, then torch's first tensor), an arena of 16 GiB and one of 64 GiB mapped and
released, with --dummy-ops the first and a second bf16 matmul (cuBLAS's handle and kernels)
and the first F.rms_norm and argmax, then the engine on MODEL_DIR without decode graphs (its
init, weights included, under cProfile), its first eager decode forward at batch 1 under
cProfile (Triton's and torch's first launches), a second one, the first decode graph capture
(batch 1) and a second (batch 2), and the first eager prefill. A diagnostic for the warm
restore's start (bench/NOTES-hibernate.md); prints, writes no JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dummy_ops(timed) -> None:
    """First uses of cuBLAS and a few torch kernels on stand-in tensors (each loads its kernel
    lazily); run before the engine, they hide those costs from its first forward."""
    import torch

    a = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    timed("first bf16 matmul (cuBLAS handle)", lambda: a @ w)
    b = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(12288, 4096, device="cuda", dtype=torch.bfloat16)
    timed("second matmul, new shape", lambda: torch.nn.functional.linear(b, w2))
    timed("first F.rms_norm", lambda: torch.nn.functional.rms_norm(b, (4096,), w[0], 1e-6))
    timed("first argmax", lambda: b.argmax(dim=-1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dummy-ops", action="store_true", help="time cuBLAS' and a few kernels' first use first")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(threadName)s %(name)s: %(message)s")
    from dormant.worker.preload import preload

    started = time.perf_counter()
    preload()
    print(f"preload {time.perf_counter() - started:.2f} s")
    import torch

    def timed(label: str, fn, sync: bool = True):
        t = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        print(f"{label:48} {1e3 * (time.perf_counter() - t):9.1f} ms")
        return out

    from cuda.bindings import driver as cuda

    from dormant.engines.native.cuda_arena import CudaArena, check_cuda

    timed("cuInit (driver)", lambda: check_cuda(cuda.cuInit(0)), sync=False)
    timed("primary context retained (driver)", lambda: check_cuda(cuda.cuDevicePrimaryCtxRetain(check_cuda(cuda.cuDeviceGet(0)))),
          sync=False)
    timed("torch on that context (first tensor)", lambda: torch.empty(1, device="cuda"))

    for gib in (16, 64):
        arena = timed(f"arena {gib} GiB mapped", lambda gib=gib: CudaArena(gib << 30))
        timed(f"arena {gib} GiB released", arena.close)
    if args.dummy_ops:
        dummy_ops(timed)
    from dormant.engines.native.config import EngineConfig
    from dormant.engines.native.cuda_graphs import DecodeGraphs
    from dormant.engines.native.gpu_model_runner import GPUModelRunner

    config = EngineConfig(model_dir=args.model_dir, device="cuda", cuda_graph_batch_sizes=[])
    init_profile = cProfile.Profile()
    init_profile.enable()
    runner = timed("engine init, no graphs (weights included)", lambda: GPUModelRunner(config))
    init_profile.disable()
    print(f"  its phases {runner.startup_phases}, beside {runner.startup_overlap}, weights {runner.weights_source}")
    profiler = cProfile.Profile()
    profiler.enable()
    timed("first eager decode forward, batch 1", lambda: runner._decode_forward(1))
    profiler.disable()
    timed("second eager decode forward, batch 1", lambda: runner._decode_forward(1))
    timed("eager decode forward, batch 64", lambda: runner._decode_forward(64))
    graphs = timed("first graph capture, batch 1", lambda: DecodeGraphs(runner._decode_forward, [1]))
    timed("second capture, batch 2 (new pool)", lambda: DecodeGraphs(runner._decode_forward, [2]))
    timed("graph replay, batch 1", lambda: graphs.replay(1))
    from dormant.engines.native.sequence import Sequence
    from dormant.engines.native.sampling_params import SamplingParams

    seq = Sequence("trace", list(range(1, 200)), SamplingParams(temperature=0, max_tokens=1))
    seq.block_table = list(range(-(-len(seq.token_ids) // config.block_size)))
    seq.num_scheduled_tokens = len(seq.token_ids)
    timed("first eager prefill, 199 tokens", lambda: runner.run([seq]))
    print("--- engine init, by cumulative time")
    pstats.Stats(init_profile).sort_stats("cumulative").print_stats(args.top)
    print("--- first eager decode forward, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    print("--- by cumulative time")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
