"""The GPU engine end to end on one CUDA machine: one run, one JSON (issue 3's benchmarks).

Per model shape (bench/configs/*.json), in the same process run:
  1. make the model folder: random bf16 weights, safetensors + config + word-level tokenizer;
  2. the floors: pinned host->GPU bandwidth, device copy bandwidth (read + write);
  3. the anchor: transformers `generate` on the same weights, batch 1 and a static batch of 64
     (512-token prompts, 128 new tokens), and its greedy tokens for the engine's token check;
  3b. the engine alone, no HTTP (child process; the engine as the worker loads it, through
     engines.base.get_engine): token check vs transformers (near-tie aware), memory asleep
     in-process, output and decode tok/s at 1 and 64;
  4. `python -m dormant.cli serve` (gateway + worker, engine_args {device: cuda}) and, through
     the gateway with httpx: cold first request; batch-1 decode tok/s vs the HBM roofline;
     output tok/s at 1, 8, 64 concurrent requests; then 3 idle sleeps (sleep_after) each
     followed by request -> first token through the gateway, GPU memory held asleep; direct
     worker sleep / wake times; the decode figures again after the cycles.

    PYTHONPATH=. python3 bench/bench_gpu.py --models qwen3-0.6b,qwen3-8b [--out PATH]

Writes bench/results/gpu/latest.json (or --out), after each model; `figures` holds, per model,
ours beside the floor or transformers' figure and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_serve import (OUTPUT_LEN, PROMPT_LEN, SLEEP_AFTER_S, complete, decode_figures,  # noqa: E402
                       direct_sleep_wake, log, prompts, sleep_cycles, start_server, stop_server)
from random_model import make_random_model  # noqa: E402
from report import no_anchor, print_figures, result_path, vs_anchor, vs_floor, write  # noqa: E402


# -- floors ---------------------------------------------------------------------------------------

def floors() -> dict:
    n = 2 << 30
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(4):
        torch.cuda.synchronize(); t = time.perf_counter()
        dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    h2d = n / statistics.median(times[1:])
    a = torch.randn(n // 4, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        torch.cuda.synchronize(); t = time.perf_counter()
        b.copy_(a); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    d2d = 2 * n / statistics.median(times[1:])
    del host, dev, a, b
    torch.cuda.empty_cache()
    return {"h2d_pinned_GBps": h2d / 1e9, "device_copy_GBps": d2d / 1e9}


# -- the anchor -----------------------------------------------------------------------------------

CHECK_TOKENS = 32  # greedy tokens compared with transformers, per check prompt
TIE = 0.125  # logit gap under which bf16 rounding may pick either token (tests/gpu/test_gpu_engine.py)


def check_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in (7, 100, 512)]


def hf_anchor(model_dir: Path, vocab: int, ref_path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    out = {}
    with torch.inference_mode():
        refs = []
        for p in check_prompts(vocab):  # the token check's reference (engine_only compares)
            r = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS,
                               do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            refs.append((r.sequences[0, len(p):].tolist(), torch.stack([l[0].float().cpu() for l in r.logits])))
        torch.save(refs, ref_path)
        for batch in (1, 64):
            ids = torch.tensor(prompts(batch, vocab, seed=batch), device="cuda")
            kw = dict(max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False, pad_token_id=0)
            model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            torch.cuda.synchronize(); t = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            out[f"batch_{batch}_tok_s"] = batch * OUTPUT_LEN / (time.perf_counter() - t)
            log(f"  transformers generate batch {batch}: {out[f'batch_{batch}_tok_s']:.1f} tok/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


# -- the engine alone (no HTTP), in a child process so its arena goes with it ---------------------

async def generate(engine, request_id: str, prompt: list[int], params) -> tuple[list[int], list[float]]:
    """All tokens of one request, and when each arrived (perf_counter)."""
    tokens, times = [], []
    async for output in engine.generate(request_id, prompt, params):
        new_ids = output.new_token_ids
        tokens += new_ids
        times += [time.perf_counter()] * len(new_ids)
    return tokens, times


async def token_check(engine, vocab: int, ref_path: Path) -> dict:
    """Greedy tokens vs transformers generate, alone and together: exact up to the first
    near-tie (transformers' own logit gap < TIE); a difference at a non-tie is a failure."""
    from dormant.engines.base import SamplingParams

    refs = torch.load(ref_path)
    params = SamplingParams(temperature=0, max_tokens=CHECK_TOKENS, ignore_eos=True)
    out = {"tokens_per_prompt": CHECK_TOKENS}
    ps = check_prompts(vocab)
    for mode in ("single", "batched"):
        if mode == "single":
            outs = [(await generate(engine, f"check-{i}", p, params))[0] for i, p in enumerate(ps)]
        else:  # sent together: the engine batches them
            outs = [tokens for tokens, _ in await asyncio.gather(
                *(generate(engine, f"check-b{i}", p, params) for i, p in enumerate(ps)))]
        matched, failures = [], []
        for ours, (tokens, logits) in zip(outs, refs):
            n = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), len(tokens))
            matched.append(n)
            if n < len(tokens):
                gap = float(logits[n][tokens[n]] - logits[n][ours[n]])
                if gap >= TIE:
                    failures.append({"token": n, "gap": gap})
        out[mode] = {"matched_exactly": matched, "non_tie_differences": failures}
    out["ok"] = not out["single"]["non_tie_differences"] and not out["batched"]["non_tie_differences"]
    return out


async def engine_batch(engine, vocab: int, batch: int) -> dict:
    """`batch` requests sent at once: output tok/s over the whole, and decode tok/s from the
    moment every request has its first token."""
    from dormant.engines.base import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    runs = await asyncio.gather(*(generate(engine, f"b{batch}-{i}", p, params)
                                  for i, p in enumerate(prompts(batch, vocab, seed=batch))))
    end = time.perf_counter()
    stamps = sorted(s for _, times in runs for s in times)
    decode_from = max(times[0] for _, times in runs)
    decoded = sum(1 for s in stamps if s > decode_from)
    return {f"batch_{batch}_output_tok_s": len(stamps) / (end - t),
            f"batch_{batch}_decode_tok_s": decoded / (end - decode_from) if end > decode_from else None}


async def engine_figures(engine, vocab: int, ref_path: Path | None) -> dict:
    from dormant.engines.base import SamplingParams

    await generate(engine, "warm", prompts(1, vocab, 7)[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = {}
    if ref_path is not None and ref_path.exists():
        out["token_check_vs_transformers"] = await token_check(engine, vocab, ref_path)
    _, total = torch.cuda.mem_get_info()
    await engine.sleep(1)
    torch.cuda.synchronize()
    free_asleep, _ = torch.cuda.mem_get_info()
    out["asleep_in_process"] = {"device_used_bytes": total - free_asleep,
                                "torch_reserved_bytes": torch.cuda.memory_reserved(),
                                "torch_allocated_bytes": torch.cuda.memory_allocated()}
    await engine.wake_up()
    for batch in (1, 64):
        out.update(await engine_batch(engine, vocab, batch))
    return out


def engine_only(model_dir: Path, vocab: int, ref_path: Path | None = None) -> dict:
    """The native engine as the worker loads it (engines.base: prepare, then load), without
    the worker's HTTP server and the gateway."""
    from dormant.engines.base import get_engine

    spec = get_engine("native")
    args = {"device": "cuda", "kv_cache_tokens": 65536, "max_num_seqs": 64}
    spec.prepare(args)
    loaded = spec.load(model_dir, args)
    try:
        return asyncio.run(engine_figures(loaded.engine, vocab, ref_path))
    finally:
        loaded.engine.shutdown()


def engine_only_child(model_dir: Path, vocab: int, ref_path: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--engine-only", str(model_dir), "--vocab", str(vocab),
                        "--ref", str(ref_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- one model --------------------------------------------------------------------------------------

def bench_model(name: str, work: Path, cycles: int) -> dict:
    config_path = ROOT / "bench/configs" / f"{name}.json"
    vocab = json.loads(config_path.read_text())["vocab_size"]
    t = time.perf_counter()
    model_dir = make_random_model(config_path, work / name)
    result: dict = {"model": name, "make_model_s": time.perf_counter() - t}
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    result["floors"] = fl = floors()
    result["weight_bytes"] = weight_bytes
    result["wake_floor_s"] = weight_bytes / (fl["h2d_pinned_GBps"] * 1e9)
    roofline = fl["device_copy_GBps"] * 1e9 / weight_bytes
    result["batch1_roofline_tok_s"] = roofline
    log(f"{name}: {weight_bytes / 1e9:.2f} GB; H2D {fl['h2d_pinned_GBps']:.1f} GB/s, device copy "
        f"{fl['device_copy_GBps']:.0f} GB/s; wake floor {result['wake_floor_s']:.3f} s, roofline {roofline:.0f} tok/s")
    ref_path = work / f"{name}-hf-ref.pt"
    result["hf_generate"] = anchor = hf_anchor(model_dir, vocab, ref_path)
    result["engine_only"] = eng = engine_only_child(model_dir, vocab, ref_path)
    log(f"  engine alone (no HTTP): {eng}")

    proc, url = start_server(name, model_dir, work)
    try:
        async def main():
            async with httpx.AsyncClient() as client:
                t = time.perf_counter()
                await complete(client, url, name, [1, 2, 3], 1)
                result["cold_start_to_first_token_s"] = time.perf_counter() - t
            log(f"  cold start -> first token {result['cold_start_to_first_token_s']:.1f} s")
            result["warm"] = await decode_figures(url, name, vocab, roofline, anchor)
            result["direct"] = await direct_sleep_wake(url, name, cycles)
            log(f"  direct: sleep {result['direct']['sleep_s']:.3f} s, wake_up call {result['direct']['wake_up_call_s']:.3f} s, "
                f"wake -> first token {result['direct']['wake_to_first_token_s']:.3f} s")
            result["sleep_via_gateway"] = await sleep_cycles(url, name, proc, cycles)
            result["ttft_after_sleep_vs_floor"] = result["sleep_via_gateway"]["ttft_after_sleep_median_s"] / result["wake_floor_s"]
            result["after_cycles"] = await decode_figures(url, name, vocab, roofline, anchor)
        asyncio.run(main())
    finally:
        stop_server(proc)
    return result


def figures(name: str, r: dict) -> dict:
    """One model's figures beside their floor or transformers' (hf_generate), from its result."""
    if "error" in r:
        return {}
    hf, warm, after = r["hf_generate"], r["warm"], r["after_cycles"]
    asleep = [c["gpu_memory_asleep_bytes"] for c in r["sleep_via_gateway"]["cycles"] if c["gpu_memory_asleep_bytes"]]
    hf64 = "transformers generate, static batch of 64, tok/s"
    return {
        f"{name}: request -> first token after an idle sleep, s": vs_floor(
            r["sleep_via_gateway"]["ttft_after_sleep_median_s"], "the weights' pinned host->GPU copy, s",
            r["wake_floor_s"], goal="<= 0.40 s"),
        f"{name}: GPU memory held asleep, GiB": no_anchor(max(asleep) / 2**30 if asleep else None, goal="<= 1 GiB"),
        f"{name}: batch-1 decode via the gateway, tok/s": vs_anchor(
            warm["batch1_decode_tok_s"], "HBM roofline (every weight read once a token), tok/s",
            r["batch1_roofline_tok_s"], higher_is_better=True, goal=">= 0.75 of the roofline"),
        f"{name}: 1 request via the gateway, output tok/s": vs_anchor(
            warm["concurrent_1"]["output_tok_s"], "transformers generate, batch 1, tok/s", hf["batch_1_tok_s"],
            higher_is_better=True),
        f"{name}: 64 concurrent via the gateway, output tok/s": vs_anchor(
            warm["concurrent_64"]["output_tok_s"], hf64, hf["batch_64_tok_s"], higher_is_better=True, goal=">= 5x"),
        f"{name}: 64 concurrent after the sleep cycles, output tok/s": vs_anchor(
            after["concurrent_64"]["output_tok_s"], hf64, hf["batch_64_tok_s"], higher_is_better=True, goal=">= 5x"),
        f"{name}: cold start -> first token, s": no_anchor(r["cold_start_to_first_token_s"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    ap.add_argument("--work", default="/tmp/dormant-bench")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--out", help="JSON path (default bench/results/gpu/latest.json)")
    ap.add_argument("--engine-only", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_only:
        print(json.dumps(engine_only(Path(args.engine_only), args.vocab, Path(args.ref) if args.ref else None)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"gpu": smi, "torch": torch.__version__, "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "workload": {"prompt_tokens": PROMPT_LEN, "output_tokens": OUTPUT_LEN, "sleep_after_s": SLEEP_AFTER_S},
        "models": {},
        "figures": {},
    }
    out = result_path("gpu", args.out)
    failed = False
    for name in args.models.split(","):
        try:
            report["models"][name] = bench_model(name, work, args.cycles)
        except Exception as e:  # noqa: BLE001 - record and go on to the next model
            import traceback

            traceback.print_exc()
            report["models"][name] = {"error": repr(e)}
            failed = True
        report["figures"].update(figures(name, report["models"][name]))
        write(out, report)
    for log_file in work.glob("server-*.log"):
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / log_file.name).write_text(log_file.read_text()[-200_000:])
    print_figures(report["figures"])
    log("wrote", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
