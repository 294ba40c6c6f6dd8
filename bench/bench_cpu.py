"""CPU benchmark: dormant's native engine beside transformers `generate`, same model, same run.

    python bench/bench_cpu.py [--source builtin:smollm2] [--tokens 128] [--streams 8]

Figures: cold start to first token (worker process start -> first streamed token), wake to
first token (level-1 sleep), single-stream decode tok/s and N-concurrent total tok/s (greedy,
EOS ignored). Writes bench/results/cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TF_COLD = r"""
import sys, time, torch
t0 = float(sys.argv[2])
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
model.generate(**ids, max_new_tokens=1, do_sample=False)
print(time.time() - t0)
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token_s(base: str, t0: float) -> float:
    body = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def worker_figures(model_dir: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dormant.worker", "--source", str(model_dir), "--model-id", "m", "--port", str(port)],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.02)
        cold = first_token_s(base, t0)
        httpx.post(f"{base}/sleep", params={"level": 1}, timeout=300)  # waits for the weight image
        rss_asleep = httpx.get(f"{base}/stats").json()["rss_bytes"]
        t1 = time.perf_counter()
        wake = first_token_s(base, t1)
        rss_awake = httpx.get(f"{base}/stats").json()["rss_bytes"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"cold_start_to_first_token_s": cold, "wake_to_first_token_s": wake,
            "rss_asleep_bytes": rss_asleep, "rss_awake_bytes": rss_awake}


def engine_decode(model_dir: Path, tokens: int, streams: int, dtype: str) -> dict:
    from dormant.engines.native.config import EngineConfig
    from dormant.engines.native.llm_engine import LLMEngine
    from dormant.engines.native.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(str(model_dir), dtype=dtype, backup_weights=False))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [[1, 4093, 2030, 253, 1345 + i] for i in range(streams)]
    eng.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    out = {}
    for n in (1, streams):
        t = time.perf_counter()
        done = eng.generate(prompts[:n], params)
        out[n] = sum(map(len, done)) / (time.perf_counter() - t)
    del eng
    return out


def transformers_decode(model_dir: Path, tokens: int, streams: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for n in (1, streams):
        ids = torch.tensor([[1, 4093, 2030, 253, 1345 + i] for i in range(n)])
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=2)
        model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=2)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        out[n] = n * tokens / (time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="builtin:smollm2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from dormant.store.models import materialize

    model_dir = materialize(args.source)
    import torch

    load_before = os.getloadavg()
    results: dict = {"model": args.source, "tokens": args.tokens, "streams": args.streams}
    results["worker"] = worker_figures(model_dir)
    t0 = time.time()
    tf_cold = float(subprocess.check_output([sys.executable, "-c", TF_COLD, str(model_dir), str(t0)], stderr=subprocess.DEVNULL))
    results["transformers_cold_start_to_first_token_s"] = tf_cold
    tf = transformers_decode(model_dir, args.tokens, args.streams)
    results["transformers_generate_tok_s"] = {"1": tf[1], str(args.streams): tf[args.streams]}
    for dtype in ("mixed", "float32", "bfloat16"):
        ours = engine_decode(model_dir, args.tokens, args.streams, dtype)
        results[f"dormant_{dtype}_tok_s"] = {"1": ours[1], str(args.streams): ours[args.streams]}
    d = results["dormant_mixed_tok_s"]
    results["ratios"] = {
        "single_stream_vs_transformers": d["1"] / tf[1],
        f"{args.streams}_streams_vs_transformers_batched": d[str(args.streams)] / tf[args.streams],
        f"{args.streams}_streams_total_vs_single_stream": d[str(args.streams)] / d["1"],
        "cold_start_vs_transformers": results["worker"]["cold_start_to_first_token_s"] / tf_cold,
    }
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                          # Other processes on these 2 cores skew every figure: check these first.
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    results["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    out = Path(args.out or ROOT / "bench" / "results" / f"cpu-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
