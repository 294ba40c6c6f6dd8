"""A warm restore (image in the page cache) of one model, once per variant of the start, each in
a process forked from one that has done the zygote's imports, as the gateway's workers are.

    python3 bench/restore_variants.py --config bench/configs/qwen3-8b.json --model-dir /tmp/m8 \\
        --variants current,bindings_copier,tokenizer_after --repeats 3 [--standby] --out results.json

A diagnostic for the warm restore's critical path (bench/NOTES-hibernate.md): it times, from
the fork, the engine ready (tokenizer included, as the worker's create_engine builds it) and
its first token at batch 1, and keeps the runner's phases. It goes through no gateway and no
HTTP server: bench_hibernate.py measures that path. --standby times from the moment the CUDA
context and the first kernels are ready, as a standby worker's start. Variants, each a change to the current
start made in the child before it begins:

    current            the start as shipped
    bindings_copier    the restore's copies through cuda-bindings (the GIL released per call)
    threads8           8 image readers x 16 MiB instead of 16 x 8 MiB
    switch5ms          the GIL's switch interval left at 5 ms while the weights stream
    tokenizer_weights  the tokenizer loaded beside once the weights stream, not at the start
    tokenizer_after    the tokenizer loaded after the engine, not beside it
    no_warm            cuBLAS's and a few kernels' first use left to the first graph capture

Rounds run the variants in turn, so a drift of the machine spreads over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("current", "bindings_copier", "threads8", "switch5ms", "tokenizer_weights", "tokenizer_after",
            "no_warm")


def apply_variant(name: str) -> None:
    """Patch the start for `name` (in the forked child, before anything of it runs)."""
    from dormant.engines.native import arena_copier, engine_image, gpu_model_runner, gpu_start

    if name == "bindings_copier":
        from dormant.engines.native.cuda_arena import check_cuda

        def copy(self, offset, host_address, nbytes):
            cuda = self._cuda
            event = self._events.get(host_address)
            if event is None:
                event = self._events[host_address] = (
                    check_cuda(cuda.cuEventCreate(cuda.CUevent_flags.CU_EVENT_DISABLE_TIMING)), None)
            check_cuda(cuda.cuMemcpyHtoDAsync(self._base + offset, host_address, nbytes, self._stream))
            check_cuda(cuda.cuEventRecord(event[0], self._stream))
            return lambda: check_cuda(cuda.cuEventSynchronize(event[0]))

        arena_copier.ArenaCopier.copy = copy
    elif name == "threads8":
        engine_image.READ_BYTES = 16 << 20
        gpu_start.restore_threads = gpu_model_runner.restore_threads = lambda: 8
    elif name == "switch5ms":
        gpu_model_runner.OVERLAP_SWITCH_INTERVAL_S = 0.005
    elif name == "no_warm":
        gpu_start._first_kernels = lambda: None
    elif name == "tokenizer_weights":
        gpu_model_runner.GPUModelRunner.beside_load_at = "weights"
    elif name not in ("current", "tokenizer_after"):
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def restore_once(model_dir: Path, variant: str, standby: bool = False) -> dict:
    """In the forked child: the worker's start up to the first token, timed from here, or with
    `standby` from the moment its CUDA context and first kernels are ready, as in a standby
    worker (worker/standby.py) that a request takes."""
    started = time.perf_counter()
    apply_variant(variant)
    from dormant.engines import create_engine, prepare
    from dormant.engines.native.sampling_params import SamplingParams

    prepare("native", {"device": "cuda"})
    if standby:
        from dormant.engines.native import gpu_start

        gpu_start.early_context_error()
        gpu_start.first_kernels_warm()
        started = time.perf_counter()
    if variant == "tokenizer_after":
        from transformers import AutoTokenizer

        from dormant.engines.native.async_engine import AsyncLLMEngine
        from dormant.engines.native.config import EngineConfig
        from dormant.engines.native.llm_engine import LLMEngine

        engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_args(model_dir, {"device": "cuda"})))
        engine_ready = time.perf_counter() - started
        AutoTokenizer.from_pretrained(model_dir)
    else:
        engine, _tokenizer, _ = create_engine("native", model_dir, {"device": "cuda"})
        engine_ready = None
    ready = time.perf_counter() - started

    async def first() -> None:
        async for _ in engine.generate("r", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=1)):
            break

    asyncio.run(first())
    first_token = time.perf_counter() - started
    llm = engine.engine
    runner = llm.model_runner
    read = runner.image.last_read
    return {"variant": variant, "ready_s": ready, "engine_ready_s": engine_ready or ready, "first_token_s": first_token,
            "weights_source": runner.weights_source, "phases": runner.startup_phases,
            "overlapped": runner.startup_overlap,
            "image_read": None if read is None else {"s": read.seconds, "gbps": read.gbps, "threads": read.threads},
            "graphs_captured": sorted(runner.graphs.capture_seconds) if runner.graphs else []}


def in_child(fn, *args) -> dict:
    """fn(*args) in a forked child; its dict back through a pipe ({"error": ...} on failure)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            out = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(write_end, "w") as f:
            json.dump(out, f, default=str)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "the child died without a word"}


def write_image(config: str, model_dir: Path) -> dict:
    """In a child: the random model if missing, one start from its safetensors, the image."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_model import make_random_model

    make_random_model(config, model_dir)
    from dormant.engines.native.config import EngineConfig
    from dormant.engines.native.llm_engine import LLMEngine

    llm = LLMEngine(EngineConfig.from_args(model_dir, {"device": "cuda"}))
    return {"source": llm.model_runner.weights_source, "image": str(llm.model_runner.save_image())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="model shape (bench/configs/*.json)")
    p.add_argument("--model-dir", required=True, type=Path, help="the random model's folder (made if missing)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--standby", action="store_true", help="time from a ready CUDA context, as a standby worker")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(threadName)s %(name)s: %(message)s")
    from dormant.worker.preload import preload

    preload()
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    print("image:", in_child(write_image, args.config, args.model_dir), flush=True)
    in_child(restore_once, args.model_dir, "current")  # the image into the page cache
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for name in variants:
            run = in_child(restore_once, args.model_dir, name, args.standby)
            runs[name].append(run)
            print(f"round {round_} {name:16} " + (run["error"] if "error" in run else
                  f"ready {run['ready_s']:.2f} s, first token {run['first_token_s']:.2f} s, "
                  f"phases { {k: round(v, 2) for k, v in run['phases'].items()} }, "
                  f"beside { {k: round(v, 2) for k, v in run['overlapped'].items()} }, read {run['image_read']}"),
                  flush=True)
    summary = {}
    print(f"\n{'variant':16} {'first token, median of ' + str(args.repeats):>28} {'vs current':>11}")
    for name in variants:
        ok = [r["first_token_s"] for r in runs[name] if "error" not in r]
        summary[name] = statistics.median(ok) if ok else None
    for name in variants:
        base, ours = summary.get("current"), summary[name]
        ratio = f"{ours / base:.2f}x" if base and ours else "-"
        print(f"{name:16} {ours if ours is None else round(ours, 3):>28} {ratio:>11}")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": platform.node(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "config": args.config, "standby": args.standby,
            "median_first_token_s": summary, "runs": runs,
        }, indent=2))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
