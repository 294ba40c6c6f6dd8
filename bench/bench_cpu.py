"""CPU benchmark: dormant through its gateway beside transformers, same model, same run.

    python bench/bench_cpu.py [--source builtin:smollm2] [--tokens 128] [--streams 8]

Ours, all through a real `dormant serve` (gateway + worker process, HTTP, SSE):
  cold start -> first token   the model cold, gateway just up: request sent -> first content token
  restart -> first token      after `unload`, gateway long up (zygote ready, engine image on disk)
  wake -> first token         after the idle policy put the model to sleep (level 1)
  decode tok/s, 1 stream      128 greedy tokens (EOS ignored), first token -> last token
  total tok/s, N streams      N concurrent requests of 128 tokens, all tokens / wall time
  gateway overhead            p50 of a 1-token request via the gateway minus direct to the worker
Anchors, in the same run: transformers `from_pretrained` -> first token in a fresh process, and
`generate` (128 new tokens, greedy) at batch 1 and at batch N.

Writes bench/results/cpu/latest.json (or --out) and prints a table: ours, the anchor, the ratio.
Other processes on a small machine skew every figure: the load average is recorded.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gateway_process import free_port, wait_healthy
from report import print_figures, result_path, vs_anchor, write

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TF_COLD = r"""
import sys, time
t0 = float(sys.argv[2])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = tok.apply_chat_template(__import__("json").loads(sys.argv[3]), add_generation_prompt=True, return_tensors="pt", return_dict=True)
model.generate(**ids, max_new_tokens=1, do_sample=False)
print(time.time() - t0)
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def stream_chat(base: str, max_tokens: int, prompt_suffix: str = "") -> dict:
    """One streamed greedy chat request: time to first token, decode rate after it."""
    messages = [{"role": "user", "content": QUESTION[0]["content"] + prompt_suffix}]
    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    n = usage["completion_tokens"]
    return {"ttft_s": first - t0, "total_s": last - t0, "tokens": n,
            "decode_tok_s": (n - 1) / (last - first) if last > first else float("nan")}


def wait_state(base: str, state: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in httpx.get(f"{base}/running", timeout=10).json()["running"]:
            if r["state"] == state:
                return r
        time.sleep(0.05)
    raise TimeoutError(f"model never reached {state}")


def ours(source: str, tokens: int, streams: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "dormant.yaml"
        # sleep_after is long while we measure decode, then lowered by a per-request keep_alive.
        # engine native named: engine auto serves the embedded SmolLM2 with llama.cpp on a CPU
        # machine now (issue 14), and this bench measures the native engine
        cfg.write_text(json.dumps({"port": port, "models": {"smollm2": {
            "source": source, "engine": "native", "sleep_after": "10m", "stop_after": -1,
            "max_concurrent_requests": streams}}}))
        # the workers' secret, ours to choose, so the bench may call the worker directly
        token = "bench-" + os.urandom(16).hex()
        gw = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                              stderr=subprocess.DEVNULL, env={**os.environ, "DORMANT_WORKER_TOKEN": token})
        try:
            wait_healthy(base, gw)
            out: dict = {"cold_start_to_first_token_s": stream_chat(base, 1)["ttft_s"]}
            stream_chat(base, 8)  # warm-up
            single = stream_chat(base, tokens)
            out["decode_tok_s_1_stream"] = single["decode_tok_s"]
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(streams) as pool:
                runs = list(pool.map(lambda i: stream_chat(base, tokens, f" ({i})"), range(streams)))
            out[f"total_tok_s_{streams}_streams"] = sum(r["tokens"] for r in runs) / (time.perf_counter() - t0)
            out["total_tok_s_1_stream"] = single["tokens"] / single["total_s"]

            worker = wait_state(base, "ready")
            direct = f"http://127.0.0.1:{worker['port']}"
            one = {"model": "smollm2", "messages": QUESTION, "max_tokens": 1, "temperature": 0}
            # Alternate direct and gateway calls on kept-alive connections, so that background
            # work (the weight image written after load) weighs on both sides alike.
            lat: dict[str, list[float]] = {"direct": [], "gateway": []}
            with httpx.Client(timeout=60) as client:
                for i in range(80):
                    name, url = ("direct", direct) if i % 2 else ("gateway", base)
                    t = time.perf_counter()
                    headers = {"Authorization": f"Bearer {token}"} if name == "direct" else None
                    client.post(f"{url}/v1/chat/completions", json=one, headers=headers).raise_for_status()
                    lat[name].append(time.perf_counter() - t)
            out["request_1_token_p50_ms"] = {k: statistics.median(v) * 1000 for k, v in lat.items()}
            out["gateway_overhead_p50_ms"] = statistics.median(
                [g - d for g, d in zip(lat["gateway"], lat["direct"])]) * 1000

            # keep_alive 0: the model sleeps as soon as this request ends.
            httpx.post(f"{base}/v1/chat/completions", json={**one, "keep_alive": 0}, timeout=60)
            asleep = wait_state(base, "asleep")
            out["rss_asleep_bytes"] = asleep.get("memory_bytes")
            out["wake_to_first_token_s"] = stream_chat(base, 1)["ttft_s"]
            out["rss_awake_bytes"] = wait_state(base, "ready").get("memory_bytes")

            # A start with the gateway long up: the zygote has imported torch and the engine,
            # and the engine image from the first start is on disk.
            httpx.post(f"{base}/unload", json={"model": "smollm2"}, timeout=120).raise_for_status()
            out["start_from_image_zygote_warm_to_first_token_s"] = stream_chat(base, 1)["ttft_s"]
        finally:
            gw.terminate()
            gw.wait(timeout=60)
    return out


def transformers_anchor(model_dir: Path, tokens: int, streams: int) -> dict:
    t0 = time.time()
    cold = float(subprocess.check_output(
        [sys.executable, "-c", TF_COLD, str(model_dir), str(t0), json.dumps(QUESTION)], stderr=subprocess.DEVNULL))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {"cold_start_to_first_token_s": cold}
    for n in (1, streams):
        prompts = [QUESTION[0]["content"] + (f" ({i})" if n > 1 else "") for i in range(n)]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id or 2)
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=kw["pad_token_id"])
        t = time.perf_counter()
        model.generate(**batch, **kw)
        out[f"generate_tok_s_batch_{n}"] = n * tokens / (time.perf_counter() - t)
    return out


def figures(us: dict, tf: dict, n: int) -> dict:
    """Ours beside transformers in the same run; the goals are DESIGN.md's for the CPU."""
    cold = "transformers from_pretrained -> first token, fresh process, s"
    return {
        "cold start -> first token, s": vs_anchor(us["cold_start_to_first_token_s"], cold,
                                                  tf["cold_start_to_first_token_s"], higher_is_better=False),
        "wake -> first token, s": vs_anchor(us["wake_to_first_token_s"], cold, tf["cold_start_to_first_token_s"],
                                            higher_is_better=False),
        "restart, zygote up -> first token, s": vs_anchor(us["start_from_image_zygote_warm_to_first_token_s"], cold,
                                                          tf["cold_start_to_first_token_s"], higher_is_better=False),
        "decode tok/s, 1 stream": vs_anchor(us["decode_tok_s_1_stream"], "transformers generate, batch 1, tok/s",
                                            tf["generate_tok_s_batch_1"], higher_is_better=True, goal=">= 2x"),
        f"total tok/s, {n} streams": vs_anchor(us[f"total_tok_s_{n}_streams"], f"transformers generate, batch {n}, tok/s",
                                               tf[f"generate_tok_s_batch_{n}"], higher_is_better=True),
        f"total tok/s, {n} streams vs 1": vs_anchor(us[f"total_tok_s_{n}_streams"], "ours, 1 stream, tok/s",
                                                    us["total_tok_s_1_stream"], higher_is_better=True, goal=">= 3x"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="builtin:smollm2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from dormant.store.models import materialize

    model_dir = materialize(args.source)  # imported once, outside every timing
    load_before = os.getloadavg()
    us = ours(args.source, args.tokens, args.streams)
    tf = transformers_anchor(model_dir, args.tokens, args.streams)
    n = args.streams
    import torch

    results = {
        "model": args.source, "tokens": args.tokens, "streams": n, "dormant": us, "transformers": tf,
        "figures": figures(us, tf, n),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }
    out = write(result_path("cpu", args.out), results)
    print_figures(results["figures"])
    print(f"gateway overhead p50: {us['gateway_overhead_p50_ms']:.2f} ms; RSS asleep {us['rss_asleep_bytes']} "
          f"awake {us['rss_awake_bytes']}; load avg {load_before} -> {os.getloadavg()}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
