"""Where one GPU start spends its time: an engine start in this process, after the zygote's
imports, its main thread (graph capture) under cProfile; the weights thread is timed by the
runner itself.

    python3 bench/trace_start.py MODEL_DIR [--drop-caches] [--top 30]

Run it after bench_hibernate.py has written the model's image (DORMANT_HOME as there), to see
the restore; with --drop-caches (root) the page cache is dropped after the imports, as the
bench drops it with the zygote up. Prints the phases, then the main thread's top functions by
cumulative and by own time. A diagnostic, no JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(threadName)s %(name)s: %(message)s")

    from dormant.worker.preload import preload

    started = time.perf_counter()
    preload()
    print(f"preload (the zygote's imports) {time.perf_counter() - started:.2f} s")
    if args.drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    from dormant.engines import create_engine

    imported = set(sys.modules)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    engine, tokenizer, _ = create_engine("native", Path(args.model_dir), {"device": "cuda"})
    profiler.disable()
    total = time.perf_counter() - started
    runner = engine.engine.model_runner
    late = sorted(m for m in set(sys.modules) - imported if "." not in m or m.count(".") <= 2)
    print(f"modules imported by the start itself ({len(set(sys.modules) - imported)}): {late}")
    print(f"engine created in {total:.2f} s; weights from {runner.weights_source}; phases "
          f"{ {k: round(v, 3) for k, v in runner.startup_phases.items()} }; beside "
          f"{ {k: round(v, 3) for k, v in runner.startup_overlap.items()} }")
    for key in ("cumulative", "tottime"):
        print(f"--- main thread, by {key}")
        pstats.Stats(profiler).sort_stats(key).print_stats(args.top)
    engine.shutdown()


if __name__ == "__main__":
    main()
