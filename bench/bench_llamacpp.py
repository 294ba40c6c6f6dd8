"""llama.cpp engine benchmark: dormant with `engine: llamacpp` through its gateway beside
llama-cpp-python used directly on the same GGUF, in the same run (issue 14's goals).

    python bench/bench_llamacpp.py [--source builtin:smollm2] [--tokens 128] [--streams 8] [--skip-anchors]

Ours, through a real `dormant serve` (gateway + worker process, HTTP, SSE), as bench_cpu.py:
decode tok/s (1 stream), total tok/s (N streams), gateway overhead p50, wake -> first token, and
process start -> first token with the zygote up (after `unload`). Anchors: llama-cpp-python's
`Llama` on the same file (load -> first token, greedy decode of the same tokens; its three runs
interleaved with our three single-stream runs, best of each); llama.cpp's
own batching (our scheduler in one process, 1 sequence vs N: the ceiling of N streams); with
--skip-anchors left out also transformers `generate` and the native engine (bench_cpu.ours).

Both sides run with the weight_repacking our engine picks on this CPU (off where it has AMX:
ggml's AMX repack dies with SIGSEGV there), recorded as `weight_repacking`. Writes
bench/results/llamacpp/latest.json (or --out); the load average is recorded.
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
from bench_cpu import QUESTION, cpu_model, stream_chat, transformers_anchor, wait_state
from bench_cpu import ours as native_ours
from gateway_process import free_port, wait_healthy
from report import no_anchor, print_figures, result_path, vs_anchor, write

ROOT = Path(__file__).resolve().parents[1]


def ours(source: str, tokens: int, streams: int, between=lambda: None) -> dict:
    """`between` runs after each of the three single-stream runs (the anchor's runs, interleaved
    with ours: this VM's speed drifts by 10-20 % within minutes)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "dormant.yaml"
        cfg.write_text(json.dumps({"port": port, "models": {"smollm2": {
            "source": source, "engine": "llamacpp", "sleep_after": "10m", "stop_after": -1,
            "max_concurrent_requests": streams}}}))
        token = "bench-" + os.urandom(16).hex()
        gw = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                              stderr=subprocess.DEVNULL, env={**os.environ, "DORMANT_WORKER_TOKEN": token})
        try:
            wait_healthy(base, gw)
            out: dict = {"cold_start_to_first_token_s": stream_chat(base, 1)["ttft_s"]}
            stream_chat(base, 8)  # warm-up
            singles = []
            for _ in range(3):
                singles.append(stream_chat(base, tokens))
                between()
            single = max(singles, key=lambda r: r["decode_tok_s"])
            out["decode_tok_s_1_stream"] = single["decode_tok_s"]
            out["total_tok_s_1_stream"] = single["tokens"] / single["total_s"]
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(streams) as pool:
                runs = list(pool.map(lambda i: stream_chat(base, tokens, f" ({i})"), range(streams)))
            out[f"total_tok_s_{streams}_streams"] = sum(r["tokens"] for r in runs) / (time.perf_counter() - t0)

            worker = wait_state(base, "ready")
            direct = f"http://127.0.0.1:{worker['port']}"
            one = {"model": "smollm2", "messages": QUESTION, "max_tokens": 1, "temperature": 0}
            lat: dict[str, list[float]] = {"direct": [], "gateway": []}
            with httpx.Client(timeout=60) as client:
                for i in range(80):
                    name, url = ("direct", direct) if i % 2 else ("gateway", base)
                    headers = {"Authorization": f"Bearer {token}"} if name == "direct" else None
                    t = time.perf_counter()
                    client.post(f"{url}/v1/chat/completions", json=one, headers=headers).raise_for_status()
                    lat[name].append(time.perf_counter() - t)
            out["request_1_token_p50_ms"] = {k: statistics.median(v) * 1000 for k, v in lat.items()}
            out["gateway_overhead_p50_ms"] = statistics.median(
                [g - d for g, d in zip(lat["gateway"], lat["direct"])]) * 1000

            # three of each, the median reported (one sample moved by 0.3 s between runs here)
            wakes, starts = [], []
            for i in range(3):
                httpx.post(f"{base}/v1/chat/completions", json={**one, "keep_alive": 0}, timeout=60)
                out["rss_asleep_bytes"] = wait_state(base, "asleep").get("memory_bytes")
                wakes.append(stream_chat(base, 1, f" [{i}]")["ttft_s"])
                out["rss_awake_bytes"] = wait_state(base, "ready").get("memory_bytes")
            for i in range(3):
                # the worker exits; the next request forks a new one from the zygote (long up)
                httpx.post(f"{base}/unload", json={"model": "smollm2"}, timeout=120).raise_for_status()
                starts.append(stream_chat(base, 1, f" <{i}>")["ttft_s"])
            out["wake_to_first_token_s"], out["wake_runs_s"] = statistics.median(wakes), wakes
            out["start_zygote_up_to_first_token_s"], out["start_runs_s"] = statistics.median(starts), starts
        finally:
            gw.terminate()
            gw.wait(timeout=60)
    return out


# The anchor gets our engine's weight_repacking (use_extra_bufts): ggml's AMX repack dies with
# SIGSEGV on the Xeons with AMX (engines/llamacpp/config.py), so there both run without it; the
# JSON says which setting the run had. `Llama` does not take the field: its defaults are wrapped.
LLAMA_DIRECT = r"""
import json, sys, time
t0 = float(sys.argv[2])
import llama_cpp
from llama_cpp import Llama
_defaults = llama_cpp.llama_model_default_params
def _params():
    params = _defaults()
    params.use_extra_bufts = sys.argv[5] == "1"
    return params
llama_cpp.llama_model_default_params = _params
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=len(__import__("os").sched_getaffinity(0)), verbose=False)
messages, tokens = json.loads(sys.argv[3]), int(sys.argv[4])
from jinja2 import Template
text = Template(llm.metadata["tokenizer.chat_template"]).render(messages=messages, add_generation_prompt=True)
ids = llm.tokenize(text.encode(), add_bos=False, special=True)
times = []
for n, token in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
    times.append(time.perf_counter())
    if n == 0:
        first = time.time() - t0
    if len(times) == tokens:
        break
print(json.dumps({"load_to_first_token_s": first, "decode_tok_s": (tokens - 1) / (times[-1] - times[0])}))
"""


def llama_direct_once(gguf: Path, tokens: int, weight_repacking: bool) -> dict:
    """llama-cpp-python's own `Llama` in a fresh process: import + load -> first token, then
    greedy decode of `tokens` tokens (EOS not checked: the same count as ours)."""
    t0 = time.time()
    return json.loads(subprocess.check_output(
        [sys.executable, "-c", LLAMA_DIRECT, str(gguf), str(t0), json.dumps(QUESTION), str(tokens),
         "1" if weight_repacking else "0"], stderr=subprocess.DEVNULL))


def best_of(runs: list[dict], weight_repacking: bool) -> dict:
    return {"load_to_first_token_s": min(r["load_to_first_token_s"] for r in runs),
            "decode_tok_s": max(r["decode_tok_s"] for r in runs), "weight_repacking": weight_repacking,
            "runs": runs}


BATCH_CEILING = r"""
import json, sys, time
from pathlib import Path
from dormant.engines.base import SamplingParams
from dormant.engines.llamacpp.config import LlamaCppConfig
from dormant.engines.llamacpp.model import LlamaModel
from dormant.engines.llamacpp.scheduler import Scheduler
scheduler = Scheduler(LlamaModel(Path(sys.argv[1]), LlamaCppConfig()))
tokens, streams = int(sys.argv[2]), int(sys.argv[3])
out = {}
for n in (1, streams, 1, streams):
    for i in range(n):
        scheduler.add_request(f"{n}-{i}-{time.perf_counter()}", [1, 2, 3, 4 + i, 100 + 7 * i, 200],
                              SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    t0, made = time.perf_counter(), 0
    while scheduler.has_unfinished:
        made += len(scheduler.step()[0])
    out[n] = max(out.get(n, 0.0), made / (time.perf_counter() - t0))
print(json.dumps(out))
"""


def batch_ceiling(gguf: Path, tokens: int, streams: int) -> dict:
    """llama.cpp's own batching on this machine: our scheduler's steps in one process, no server
    (1 sequence, then `streams` in one llama_decode per step; best of two). What N streams can
    gain over one is bounded by it: on 2 cores the Q4_1 matmuls of 8 tokens take ~5x one's."""
    runs = json.loads(subprocess.check_output([sys.executable, "-c", BATCH_CEILING, str(gguf), str(tokens),
                                               str(streams)], cwd=ROOT, stderr=subprocess.DEVNULL))
    return {"tok_s_1_sequence": runs["1"], f"tok_s_{streams}_sequences": runs[str(streams)]}


def figures(us: dict, direct: dict, n: int, ceiling: dict) -> dict:
    return {
        "decode tok/s, 1 stream": vs_anchor(us["decode_tok_s_1_stream"], "llama-cpp-python Llama.generate, tok/s",
                                            direct["decode_tok_s"], higher_is_better=True, goal=">= 0.95x"),
        f"total tok/s, {n} streams vs 1": vs_anchor(us[f"total_tok_s_{n}_streams"], "ours, 1 stream, tok/s",
                                                    us["total_tok_s_1_stream"], higher_is_better=True, goal=">= 2.5x"),
        f"llama.cpp's own batching, {n} sequences vs 1 (one process, no server)": vs_anchor(
            ceiling[f"tok_s_{n}_sequences"], "1 sequence, tok/s", ceiling["tok_s_1_sequence"], higher_is_better=True),
        "process start, zygote up -> first token, s": vs_anchor(
            us["start_zygote_up_to_first_token_s"], "llama-cpp-python import + load -> first token, s",
            direct["load_to_first_token_s"], higher_is_better=False, goal="<= 1 s"),
        "wake -> first token, s": no_anchor(us["wake_to_first_token_s"], goal="<= 0.2 s"),
        "gateway overhead p50, ms": no_anchor(us["gateway_overhead_p50_ms"], goal="<= 2 ms"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="builtin:smollm2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--skip-anchors", action="store_true", help="leave out transformers and the native engine")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from dormant.engines.llamacpp.config import LlamaCppConfig, find_gguf
    from dormant.store.models import materialize_gguf

    gguf = find_gguf(materialize_gguf(args.source))
    load_before = os.getloadavg()
    out = result_path("llamacpp", args.out)
    results: dict = {"model": args.source, "gguf": str(gguf), "tokens": args.tokens, "streams": args.streams,
                     "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
                                 "loadavg_before": load_before},
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(["python", *sys.argv])}
    # both sides with the setting our engine picks here (off where the CPU has AMX)
    weight_repacking = LlamaCppConfig().weight_repacking
    results["weight_repacking"] = weight_repacking
    results["llamacpp_batch_ceiling"] = batch_ceiling(gguf, args.tokens, args.streams)
    anchor_runs: list[dict] = []
    results["dormant_llamacpp"] = ours(args.source, args.tokens, args.streams,
                                       between=lambda: anchor_runs.append(
                                           llama_direct_once(gguf, args.tokens, weight_repacking)))
    results["llama_cpp_python"] = best_of(anchor_runs, weight_repacking)
    results["figures"] = figures(results["dormant_llamacpp"], results["llama_cpp_python"], args.streams,
                                 results["llamacpp_batch_ceiling"])
    results["machine"]["loadavg_after_ours"] = os.getloadavg()
    write(out, results)
    if not args.skip_anchors:
        from dormant.store.models import materialize

        results["transformers"] = transformers_anchor(materialize(args.source), args.tokens, args.streams)
        results["dormant_native"] = native_ours(args.source, args.tokens, args.streams)
        results["figures"]["native engine decode tok/s, 1 stream"] = vs_anchor(
            results["dormant_native"]["decode_tok_s_1_stream"], "llama-cpp-python Llama.generate, tok/s",
            results["llama_cpp_python"]["decode_tok_s"], higher_is_better=True)
        results["figures"]["transformers generate tok/s, batch 1"] = vs_anchor(
            results["transformers"]["generate_tok_s_batch_1"], "llama-cpp-python Llama.generate, tok/s",
            results["llama_cpp_python"]["decode_tok_s"], higher_is_better=True)
    results["machine"]["loadavg_after"] = os.getloadavg()
    write(out, results)
    print_figures(results["figures"])
    print(f"gateway overhead p50: {results['dormant_llamacpp']['gateway_overhead_p50_ms']:.2f} ms; "
          f"load avg {load_before} -> {os.getloadavg()}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
