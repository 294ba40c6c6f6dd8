"""Structured output's cost: decode tok/s with a JSON schema beside the same decode without one.

The engine alone (no HTTP), loaded as the worker loads it (engines.base.get_engine: prepare,
then load). Per batch size (1 and 32 by default), `batch` requests sent at once with random
prompts, greedy, a fixed number of new tokens; once unconstrained, once with a json_schema
(an object holding a long array of small objects, so no request completes its grammar before
its max_tokens and both runs decode the same number of tokens). The figure: constrained decode
tok/s / unconstrained (goal >= 0.90, issue 11).

GPU (the lead's run, kind nvidia-h200): a random-weight Qwen3-8B-shape model (bench/configs,
random_model.py). Its word-level tokenizer spells no JSON, so the folder gets a real tokenizer
instead: SmolLM2's (49k entries; `--tokenizer DIR`, carried to the machine), whose ids all lie
inside Qwen3's vocabulary (logits past it are masked as no token of the grammar).

    PYTHONPATH=. python3 bench/bench_guided.py --device cuda --tokenizer DIR     # -> results/guided/latest.json
    PYTHONPATH=. python bench/bench_guided.py --device cpu --batches 1,4 --output-len 24 --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import asyncio
import datetime as dt
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from random_model import make_random_model  # noqa: E402
from report import print_figures, result_path, vs_anchor, write  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ITEM = {"type": "object", "additionalProperties": False, "required": ["id", "name", "ok"],
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
          "properties": {"items": {"type": "array", "items": ITEM, "minItems": 64}}}


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def model_folder(args) -> Path:
    if args.model:
        return Path(args.model)
    folder = make_random_model(args.config, Path(args.work) / Path(args.config).stem, device=args.device)
    for name in TOKENIZER_FILES:  # a real tokenizer over the word-level one (see the docstring)
        if (Path(args.tokenizer) / name).is_file():
            shutil.copy(Path(args.tokenizer) / name, folder / name)
    # the shape's EOS id (Qwen3's 151645) lies past this tokenizer's 49k entries, which the
    # grammar's tokenizer refuses: the random model ends on the tokenizer's own EOS instead
    eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
    eos_id = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"].get(eos) if eos else None
    if eos_id is not None:
        for name in ("config.json", "generation_config.json"):
            path = folder / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                cfg["eos_token_id"] = eos_id
                path.write_text(json.dumps(cfg, indent=2))
    return folder


async def run_batch(engine, prompts: list[list[int]], params, sync) -> dict:
    """Every request at once: decode tok/s from the moment each has its first token, and
    how many tokens each got (the same for both runs, or the comparison is off)."""
    stamps: list[list[float]] = [[] for _ in prompts]

    async def one(i: int, prompt: list[int]) -> None:
        async for output in engine.generate(f"r{time.monotonic_ns()}-{i}", prompt, params):
            stamps[i] += [time.perf_counter()] * len(output.new_token_ids)

    sync()
    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    end = time.perf_counter()
    decode_from = max(s[0] for s in stamps)
    decoded = sum(1 for s in stamps for t in s if t > decode_from)
    return {"decode_tok_s": decoded / (end - decode_from), "output_tok_s": sum(map(len, stamps)) / (end - start),
            "tokens_per_request": sorted({len(s) for s in stamps})}


class StepProfile:
    """Where a guided step's CPU time goes: the engine step as a whole (runner.run, which
    returns after the sampler's device-to-host wait), the mask (mask_logits, of which
    llguidance's fill) and the grammar's advance after sampling. Microseconds per step."""

    def __init__(self, runner) -> None:
        import llguidance.torch
        from dormant.engines.native.core import scheduler
        from dormant.engines.native.cuda import sampler as cuda_sampler
        from dormant.engines.native.cpu import sampler as cpu_sampler

        self.totals: dict[str, float] = {}
        self.steps = 0
        self._wrap(runner, "run", "step", count=True)
        for module in (cuda_sampler, cpu_sampler):
            self._wrap(module, "mask_logits", "mask")
        self._wrap(llguidance.torch, "fill_next_token_bitmask_par", "fill")
        self._wrap(scheduler, "advance", "advance")

    def _wrap(self, owner, name: str, key: str, count: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
                if count:
                    self.steps += 1

        setattr(owner, name, timed)

    def take(self) -> dict:
        out = {k: round(v / max(self.steps, 1) * 1e6, 1) for k, v in self.totals.items()}
        out["steps"] = self.steps
        self.totals, self.steps = {}, 0
        return out


async def measure(engine, vocab: int, batches: list[int], output_len: int, repeats: int, sync) -> dict:
    from dormant.engines.base import Guidance, SamplingParams

    rng = random.Random(0)
    free = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    guided = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, guidance=Guidance("json_schema", SCHEMA))
    await run_batch(engine, [[rng.randrange(vocab) for _ in range(32)]], SamplingParams(temperature=0, max_tokens=4), sync)
    await run_batch(engine, [[rng.randrange(vocab) for _ in range(32)]], guided, sync)  # llguidance's tables
    profile = StepProfile(engine.engine.model_runner)
    out = {}
    for batch in batches:
        prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(batch)]
        runs: dict[str, list[dict]] = {"unconstrained": [], "json_schema": []}
        for _ in range(repeats):  # alternated, so drift hits both alike; the best of each
            for kind, params in (("unconstrained", free), ("json_schema", guided)):
                profile.take()
                runs[kind].append(await run_batch(engine, prompts, params, sync))
                runs[kind][-1]["step_profile_us"] = profile.take()
        best = {k: max(v, key=lambda r: r["decode_tok_s"]) for k, v in runs.items()}
        out[f"batch_{batch}"] = {**best, "all_runs": runs}
        log(f"batch {batch}:", {k: round(v["decode_tok_s"], 1) for k, v in best.items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"), help="random-weight model shape")
    ap.add_argument("--tokenizer", default=str(Path.home() / ".dormant/models/SmolLM2-135M-Instruct"),
                    help="folder with the real tokenizer the random model gets")
    ap.add_argument("--model", help="an existing model folder instead (CPU: SmolLM2)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dormant-bench")
    ap.add_argument("--out", help="JSON path (default bench/results/guided/latest.json)")
    args = ap.parse_args()
    if args.device == "cpu" and not args.model:
        args.model = args.tokenizer  # the tokenizer's own model: SmolLM2 by default
    from dormant.engines.base import get_engine

    folder = model_folder(args)
    batches = [int(b) for b in args.batches.split(",")]
    engine_args = {"device": args.device, "max_num_seqs": max(batches), "backup_weights": False}
    if args.device == "cuda":
        engine_args["kv_cache_tokens"] = 65536
    spec = get_engine("native")
    spec.prepare(engine_args)
    loaded = spec.load(folder, engine_args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    try:
        results = asyncio.run(measure(loaded.engine, len(loaded.tokenizer), batches, args.output_len, args.repeats, sync))
    finally:
        loaded.engine.shutdown()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    figures = {f"guided_decode_batch_{b}": vs_anchor(
        results[f"batch_{b}"]["json_schema"]["decode_tok_s"], "the same decode without a schema",
        results[f"batch_{b}"]["unconstrained"]["decode_tok_s"], higher_is_better=True, goal=">= 0.90")
        for b in batches}
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"device": args.device, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "workload": {"model": str(folder), "tokenizer_vocab": len(loaded.tokenizer), "prompt_tokens": 128,
                     "output_tokens": args.output_len, "schema": SCHEMA, "greedy": True},
        "results": results,
        "figures": figures,
    }
    out = result_path("guided", args.out)
    write(out, report)
    print_figures(figures)
    log("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
