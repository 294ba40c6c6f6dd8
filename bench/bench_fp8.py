"""FP8 checkpoints on the GPU (issue 12): batch-1 decode of the FP8 Qwen3-8B shape beside the
bf16 one (goal >= 1.7x), and the bytes the arena (and so the engine image) holds.

  1. the bf16 model folder (random weights, random_model.py), or --bf16-dir's if it exists
     (the burst parts' /tmp/dormant-bench-burst/qwen3-8b: 16.4 GB not written twice);
  2. each FP8 format written from it (bench/fp8_model.py, quantized on the GPU);
  3. per checkpoint, the native engine alone (no HTTP) in a child process: decode tok/s at
     batch 1 and 16 (512-token prompts, 128 new tokens, greedy, median of 3), the arena's
     weight bytes; for the first FP8 format, the engine image written and its size on disk,
     then sleep -> wake and a restore from the image, each checked to give the same tokens.

    PYTHONPATH=. python3 bench/bench_fp8.py [--config bench/configs/qwen3-8b.json] [--formats block,channel]

Disk: bf16 16.4 GB + 9.4 GB per FP8 folder + one 9.4 GB image; each FP8 folder but the first
is deleted after its run (--keep to keep them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import no_anchor, print_figures, result_path, vs_anchor, write  # noqa: E402

PROMPT_LEN, OUTPUT_LEN, RUNS = 512, 128, 3


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def decode_rate(engine, prompts: list[list[int]]) -> float:
    """Decode tok/s of the batch: (OUTPUT_LEN - 1) tokens per sequence after the first, timed
    from each step's end (the engine stepped here, as the async engine drives it)."""
    import torch

    from dormant.engines.base import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", p, params)
    stamps = []
    while engine.has_unfinished:
        outs = engine.step()
        torch.cuda.synchronize()
        now = time.perf_counter()
        stamps += [now] * sum(len(o.new_token_ids) for _, o in outs)
    first_done = sorted(stamps)[len(prompts) - 1]  # every sequence has its first token
    later = [s for s in stamps if s > first_done]
    return len(later) / (stamps[-1] - first_done)


def run_engine(model_dir: Path, check_image: bool) -> dict:
    """The child's work: one engine on `model_dir`."""
    import gc

    import torch

    from dormant.engines.base import SamplingParams
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    def start():
        config = EngineConfig.from_args(model_dir, {
            "device": "cuda", "kv_cache_tokens": 32768, "max_num_seqs": 16, "cuda_graph_batch_sizes": [1, 2, 4, 8, 16],
            # no image written in the background beside the timed decode: save_image() below
            "enable_prefix_caching": False, "backup_weights": False})
        t = time.perf_counter()
        engine = LLMEngine(config)
        return engine, time.perf_counter() - t

    engine, start_s = start()
    runner = engine.model_runner
    g = torch.Generator().manual_seed(7)
    vocab = runner.hf_config.vocab_size
    prompts = torch.randint(10, vocab - 10, (16, PROMPT_LEN), generator=g).tolist()
    engine.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    out = {"start_s": start_s, "weights_source": runner.weights_source, "weights_bytes": runner.weights_bytes,
           "quant": runner.quant.kind if runner.quant else None}
    for batch in (1, 16):
        rates = [decode_rate(engine, prompts[:batch]) for _ in range(RUNS)]
        out[f"batch_{batch}_decode_tok_s"] = statistics.median(rates)
        out[f"batch_{batch}_runs"] = rates
        log(f"  {model_dir.name}: batch {batch} decode {statistics.median(rates):.1f} tok/s {[round(r) for r in rates]}")
    if check_image:
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        expected = engine.generate(prompts[:4], params)
        t = time.perf_counter()
        engine.sleep(1)
        out["sleep_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.wake_up()
        woken = engine.generate(prompts[:4], params)
        out["wake_to_tokens_s"] = time.perf_counter() - t
        out["same_tokens_after_wake"] = woken == expected
        runner.save_image()
        data = runner.image.image.data_path
        out["image_bytes"] = data.stat().st_size
        runner.arena.close()
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
        engine, out["restore_start_s"] = start()
        out["restore_source"] = engine.model_runner.weights_source
        out["same_tokens_after_restore"] = engine.generate(prompts[:4], params) == expected
        engine.model_runner.arena.close()
    return out


def run_child(model_dir: Path, check_image: bool) -> dict:
    cmd = [sys.executable, __file__, "--engine", str(model_dir)] + (["--check-image"] if check_image else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=420)
    sys.stderr.write(r.stderr[-3000:])
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    for line in r.stdout.splitlines():
        if line.startswith("[") and not line.startswith("[{"):
            print(line, flush=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"))
    ap.add_argument("--bf16-dir", default="/tmp/dormant-bench-burst/qwen3-8b")
    ap.add_argument("--work", default="/tmp/dormant-bench-fp8")
    ap.add_argument("--formats", default="block,channel")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--check-image", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        os.environ.setdefault("DORMANT_HOME", str(Path(args.engine).parent / "home"))
        print(json.dumps(run_engine(Path(args.engine), args.check_image)))
        return 0

    import torch

    from fp8_model import make_fp8_model
    from random_model import make_random_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DORMANT_HOME"] = str(work / "home")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": {"gpu": smi, "torch": torch.__version__, "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "workload": {"prompt_tokens": PROMPT_LEN, "output_tokens": OUTPUT_LEN, "runs": RUNS},
              "models": {}, "figures": {}}
    out = result_path("fp8", args.out)
    bf16 = Path(args.bf16_dir)
    if not ((bf16 / "config.json").is_file() and any(bf16.glob("*.safetensors"))):
        bf16 = work / "qwen3-8b"
        t = time.perf_counter()
        make_random_model(args.config, bf16)
        log(f"bf16 model written in {time.perf_counter() - t:.0f} s")
    report["bf16_dir"] = str(bf16)
    report["models"]["bf16"] = base = run_child(bf16, check_image=False)
    write(out, report)
    failed = "error" in base
    for i, fmt in enumerate(args.formats.split(",")):
        t = time.perf_counter()
        folder = make_fp8_model(bf16, work / f"qwen3-8b-fp8-{fmt}", fmt, device="cuda")
        torch.cuda.empty_cache()
        log(f"{fmt} FP8 checkpoint written in {time.perf_counter() - t:.0f} s")
        result = run_child(folder, check_image=i == 0)
        result["checkpoint_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        report["models"][f"fp8-{fmt}"] = result
        failed |= "error" in result
        if "error" not in result and "error" not in base:
            report["figures"][f"{fmt}_batch1_decode_tok_s"] = vs_anchor(
                result["batch_1_decode_tok_s"], "bf16, same shape, same run", base["batch_1_decode_tok_s"], True,
                goal=">= 1.7x")
            report["figures"][f"{fmt}_batch16_decode_tok_s"] = vs_anchor(
                result["batch_16_decode_tok_s"], "bf16, same shape, same run", base["batch_16_decode_tok_s"], True)
            report["figures"][f"{fmt}_weight_bytes"] = vs_anchor(
                result["weights_bytes"], "bf16 arena weight bytes", base["weights_bytes"], False)
            if "image_bytes" in result:
                report["figures"][f"{fmt}_image_bytes"] = no_anchor(result["image_bytes"], goal="the FP8 bytes")
                report["figures"][f"{fmt}_same_tokens_after_wake_and_restore"] = no_anchor(
                    float(result["same_tokens_after_wake"] and result["same_tokens_after_restore"]
                          and result["restore_source"] == "image"), goal="1.0")
        write(out, report)
        if i > 0 and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_figures(report["figures"])
    log("wrote", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
