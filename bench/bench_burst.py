"""Bursts through the HTTP API (issue 12): output tok/s of concurrent streams of 512 prompt
tokens and 128 output tokens each (greedy, ignore_eos), beside vLLM 0.26 on the same GPU and model.

    python bench/bench_burst.py --config bench/configs/qwen3-8b.json                  # dormant
    PYTHONPATH=/tmp/vsite:$PYTHONPATH python bench/bench_burst.py --config bench/configs/qwen3-8b.json \\
        --server vllm                                                                 # the anchor
    python bench/bench_burst.py --combine OURS.json VLLM.json --out OURS.json         # figures of both

dormant runs with its default configuration (`dormant serve`, the model's source and nothing
else: no max_concurrent_requests), vLLM with its own (`--enable-sleep-mode`, VLLM_SERVER_DEV_MODE=1
for /sleep). Each burst sends all its requests at once; its output tok/s is the completion
tokens over the wall time from the first send to the last token. In order:

  cold     the first request after the server is up starts the model (dormant: a full cold
           start from safetensors; vLLM: already loaded), then BURST streams at once (the first
           burst after a start), then BURST again (the second)
  curve    after SETTLE_S idle (dormant: its idle work, the decode graphs not captured during
           the start): 1, 8, 32, 64, 128, 256 concurrent
  long     a lone prompt of LONG_PROMPT_LEN (4,096) tokens, one output token: request -> first
           token, the median of LONG_PROMPT_RUNS, each prompt new (issue 12: <= vLLM's);
           --long-only: this part alone, right after the first request
  restore  dormant only: POST /unload (the engine image kept), one request (restore -> first
           token), then BURST; and again with the burst itself finding the model stopped
  wake     the model asleep (dormant: a request with keep_alive 0; vLLM: POST /sleep?level=1),
           one request (dormant wakes on it; vLLM after POST /wake_up), then BURST; and again
           with the burst itself finding the model asleep (vLLM: /wake_up then the burst, timed)

Each prompt is new (random ids, seeded per burst): no burst reads another's prefix cache.
--model-dir reuses a model folder (bench/random_model.py makes one from --config otherwise,
in a child process, so this one holds no GPU memory). Writes results/burst[-vllm]/latest.json
(or --out) after each part; `figures` (dormant, with --anchor or --combine) holds ours beside
vLLM's and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gateway_process import free_port  # noqa: E402
from report import no_anchor, print_figures, result_path, vs_anchor, write  # noqa: E402

PROMPT_LEN, OUTPUT_LEN = 512, 128
BURST = 64
CURVE = (1, 8, 32, 64, 128, 256)
LONG_PROMPT_LEN, LONG_PROMPT_RUNS = 4096, 5
SETTLE_S = 10.0  # idle before the curve: dormant's idle work (IDLE_GRACE_S 2 s, then ~0.15 s a graph)
# --burst, --curve and --settle change these (a quick look on the CPU with SmolLM2: --burst 4
# --curve 1,4 --settle 0 --model-dir ~/.dormant/models/SmolLM2-135M-Instruct --prompt-len 64 --output-len 8)
MODEL = "m"
COLD_ONLY = False  # --cold-only: the cold bursts and the curve, no restore or wake (an A/B's quick run)
LONG_ONLY = False  # --long-only: the first request (dormant: its cold start), then the lone long prompt
# the worker log's lines that say what the GPU runner did (graph capture, the start, failures)
LOG_KEYS = ("GPU runner ready", "triton kernel", "decode graph for batch", "graph capture starts", "engine step failed",
            "ready after", "awake after", "Traceback", "Error")


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# -- one burst ------------------------------------------------------------------------------------

def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(PROMPT_LEN)] for _ in range(n)]


async def stream(client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int, t0: float,
                 keep_alive: float | None = None) -> dict:
    """One streamed completion: its first and last token's time after t0, its token count."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    first = last = None
    tokens = 0
    async with client.stream("POST", base + "/v1/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):  # a held stream that ended in an error (the start failed)
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter() - t0
                first = last if first is None else first
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"first": first, "last": last, "tokens": tokens}


async def burst(base: str, n: int, vocab: int, seed: int, before=None) -> dict:
    """n streams at once; `before` (a coroutine function) runs first, inside the timed wall."""
    ps = prompts(n, vocab, seed)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)) as c:
        t0 = time.perf_counter()
        if before is not None:
            await before()
        rs = await asyncio.gather(*(stream(c, base, p, OUTPUT_LEN, t0) for p in ps))
    wall = max(r["last"] for r in rs)
    tokens = sum(r["tokens"] for r in rs)
    firsts = sorted(r["first"] for r in rs)
    out = {"concurrency": n, "output_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens,
           "ttft_median_s": statistics.median(firsts), "ttft_max_s": firsts[-1],
           # the same tokens over the time from the first token out: what the start or wake did not take
           "output_tok_s_from_first_token": tokens / (wall - firsts[0])}
    log(f"  {n:>3} streams: {out['output_tok_s']:7.0f} output tok/s over {wall:.2f} s "
        f"(ttft median {out['ttft_median_s']:.2f} s, max {out['ttft_max_s']:.2f} s)")
    return out


async def one_token(base: str, vocab: int, seed: int, keep_alive: float | None = None) -> float:
    """Request -> first token of a lone 1-token completion (what starts, restores or wakes)."""
    async with httpx.AsyncClient() as c:
        t0 = time.perf_counter()
        r = await stream(c, base, prompts(1, vocab, seed)[0][:16], 1, t0, keep_alive)
    return r["first"]


async def long_prompt(base: str, vocab: int, seeds) -> dict:
    """A lone LONG_PROMPT_LEN-token prompt, one token out, LONG_PROMPT_RUNS times in turn (the
    first one also warms what a prompt of that length first uses): request -> first token."""
    times = []
    async with httpx.AsyncClient() as c:
        for _ in range(LONG_PROMPT_RUNS + 1):
            rng = random.Random(next(seeds))
            prompt = [rng.randrange(10, vocab - 10) for _ in range(LONG_PROMPT_LEN)]
            t0 = time.perf_counter()
            times.append((await stream(c, base, prompt, 1, t0))["first"])
    out = {"prompt_len": LONG_PROMPT_LEN, "first_s": times[0], "ttft_s": times[1:],
           "ttft_median_s": statistics.median(times[1:])}
    log(f"  lone {LONG_PROMPT_LEN}-token prompt: first token after {out['ttft_median_s'] * 1000:.1f} ms "
        f"(median of {LONG_PROMPT_RUNS}; the first of all {times[0] * 1000:.1f} ms)")
    return out


# -- the servers ----------------------------------------------------------------------------------

def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with {proc.returncode}")
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.05)


def start_dormant(model_dir: Path, work: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`dormant serve` with the model's source and nothing else; its own store, images wiped."""
    home = work / "home"
    # the first start is a full cold start, as on a new machine: no image, no compiled kernels
    shutil.rmtree(home / "images", ignore_errors=True)
    shutil.rmtree(work / "triton", ignore_errors=True)
    port = free_port()
    cfg = work / "dormant-burst.yaml"
    cfg.write_text(json.dumps({"port": port, "models": {MODEL: {"source": str(model_dir)}}}))
    env = {**os.environ, "DORMANT_HOME": str(home), "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(work / "triton")}
    proc = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, 120, "dormant /health", proc)
    return proc, base


def start_vllm(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", MODEL, "--enable-sleep-mode"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, 560, "vLLM /health", proc)
    return proc, base, time.perf_counter() - started


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def replica(base: str) -> dict:
    return httpx.get(base + "/running", timeout=10).json()["running"][0]


def engine_figures(before: dict | None, after: dict | None, wall: float) -> dict:
    """What dormant's engine loop did during a burst, from its worker's /stats before and after
    (None: no worker then, so nothing yet): steps, the time inside them, and the decode graphs'
    GPU time per replay. Where the loop is busy the whole wall but a replay takes a fraction of
    a step, the host side (Python, the GIL shared with the HTTP thread) sets the pace."""
    b, a = before or {}, after or {}
    d = {k: (a.get(k) or 0) - (b.get(k) or 0)
         for k in ("num_steps", "step_seconds", "num_decode_graph_steps", "decode_graph_gpu_seconds")}
    steps, graphs = d["num_steps"], d["num_decode_graph_steps"]
    return {"steps": steps, "loop_busy_share": d["step_seconds"] / wall,
            "step_ms_mean": 1000 * d["step_seconds"] / steps if steps else None,
            "decode_graph_steps": graphs,
            "decode_graph_gpu_ms_mean": 1000 * d["decode_graph_gpu_seconds"] / graphs if graphs else None}


# -- the runs -------------------------------------------------------------------------------------

_burst = burst  # run_dormant's own burst wraps it with the engine's figures

async def run_dormant(base: str, vocab: int, out: dict, save) -> None:
    seed = iter(range(1000, 10_000))

    async def burst(base: str, n: int, vocab: int, seed: int) -> dict:
        before = await asyncio.to_thread(replica, base)
        result = await _burst(base, n, vocab, seed)
        after = await asyncio.to_thread(replica, base)
        result["engine"] = engine_figures(before.get("worker_stats"), after.get("worker_stats"), result["wall_s"])
        log(f"      engine: {result['engine']}")
        return result
    log("cold: the first request starts the model")
    out["cold_start_to_first_token_s"] = await one_token(base, vocab, next(seed))
    rep = replica(base)
    out["max_concurrent_requests"] = rep.get("max_concurrent_requests")
    out["worker_max_num_seqs"] = (rep.get("worker_stats") or {}).get("max_num_seqs")
    if LONG_ONLY:
        out["long_prompt"] = await long_prompt(base, vocab, seed)
        return
    out["cold_first_burst"] = await burst(base, BURST, vocab, next(seed))
    out["cold_second_burst"] = await burst(base, BURST, vocab, next(seed))
    save()
    log(f"curve, after {SETTLE_S:.0f} s idle")
    await asyncio.sleep(SETTLE_S)
    out["curve"] = [await burst(base, n, vocab, next(seed)) for n in CURVE]
    out["long_prompt"] = await long_prompt(base, vocab, seed)
    save()
    if COLD_ONLY:
        return

    async def unload():
        httpx.post(base + "/unload", json={"model": MODEL}, timeout=600).raise_for_status()

    log("restore: unloaded (image kept), one request, then the burst")
    await unload()
    out["restore_to_first_token_s"] = await one_token(base, vocab, next(seed))
    out["restore_first_burst"] = await burst(base, BURST, vocab, next(seed))
    log("restore: unloaded, the burst finds it stopped")
    await unload()
    out["restore_burst_as_first_request"] = await burst(base, BURST, vocab, next(seed))
    save()

    async def to_sleep():
        await one_token(base, vocab, next(seed), keep_alive=0)  # sleep_after's tier at once
        await asyncio.to_thread(wait_until, lambda: replica(base)["state"] == "asleep", 120, "asleep")

    log("wake: asleep, one request, then the burst")
    await to_sleep()
    out["wake_to_first_token_s"] = await one_token(base, vocab, next(seed))
    out["wake_first_burst"] = await burst(base, BURST, vocab, next(seed))
    log("wake: asleep, the burst finds it asleep")
    await to_sleep()
    out["wake_burst_as_first_request"] = await burst(base, BURST, vocab, next(seed))
    save()


async def run_vllm(base: str, vocab: int, out: dict, save) -> None:
    seed = iter(range(1000, 10_000))
    out["first_request_to_first_token_s"] = await one_token(base, vocab, next(seed))
    if LONG_ONLY:
        out["long_prompt"] = await long_prompt(base, vocab, seed)
        return
    out["cold_first_burst"] = await burst(base, BURST, vocab, next(seed))
    out["cold_second_burst"] = await burst(base, BURST, vocab, next(seed))
    save()
    await asyncio.sleep(SETTLE_S)
    out["curve"] = [await burst(base, n, vocab, next(seed)) for n in CURVE]
    out["long_prompt"] = await long_prompt(base, vocab, seed)
    save()

    async def post(path: str, **params):
        async with httpx.AsyncClient(timeout=600) as c:
            (await c.post(base + path, params=params)).raise_for_status()

    log("wake: /sleep, /wake_up, one request, then the burst")
    await post("/sleep", level="1")
    t0 = time.perf_counter()
    await post("/wake_up")
    out["wake_to_first_token_s"] = time.perf_counter() - t0 + await one_token(base, vocab, next(seed))
    out["wake_first_burst"] = await burst(base, BURST, vocab, next(seed))
    log("wake: /sleep, then /wake_up and the burst, timed together")
    await post("/sleep", level="1")
    out["wake_burst_as_first_request"] = await burst(base, BURST, vocab, next(seed), before=lambda: post("/wake_up"))
    save()


# -- figures --------------------------------------------------------------------------------------

def figures(ours: dict, anchor: dict | None) -> dict:
    """Each burst beside vLLM's (the same burst; restore beside vLLM's first burst after its start)."""
    def tok_s(run: dict | None, key: str) -> float | None:
        return ((run or {}).get(key) or {}).get("output_tok_s")

    goal = ">= 1.2x vLLM"
    out = {}
    for key, anchor_key, name in (
            ("cold_first_burst", "cold_first_burst", "first burst after a cold start"),
            ("cold_second_burst", "cold_second_burst", "second burst"),
            ("restore_first_burst", "cold_first_burst", "first burst after a restore (vLLM: after its start)"),
            ("wake_first_burst", "wake_first_burst", "first burst after a wake"),
            ("restore_burst_as_first_request", None, "burst that finds the model stopped (restore inside)"),
            ("wake_burst_as_first_request", "wake_burst_as_first_request", "burst that finds the model asleep")):
        label = f"{BURST} x {PROMPT_LEN}/{OUTPUT_LEN}, {name}, output tok/s"
        if key not in ours:  # not run (--long-only, --cold-only)
            continue
        if anchor is None or anchor_key is None:
            out[label] = no_anchor(tok_s(ours, key), goal=goal)
        else:
            out[label] = vs_anchor(tok_s(ours, key), f"vLLM 0.26, {anchor_key}", tok_s(anchor, anchor_key),
                                   higher_is_better=True, goal=goal)
    mine, other = ((run or {}).get("long_prompt", {}).get("ttft_median_s") for run in (ours, anchor))
    if mine is not None:
        label = f"lone {LONG_PROMPT_LEN}-token prompt, request -> first token, s"
        out[label] = (vs_anchor(mine, "vLLM 0.26", other, higher_is_better=False, goal="<= vLLM's")
                      if other else no_anchor(mine, goal="<= vLLM's"))
    theirs = {c["concurrency"]: c for c in (anchor or {}).get("curve", [])}
    for c in ours.get("curve", []):
        n = c["concurrency"]
        label = f"{n} concurrent, output tok/s"
        other = theirs.get(n, {}).get("output_tok_s")
        out[label] = (vs_anchor(c["output_tok_s"], "vLLM 0.26", other, higher_is_better=True)
                      if other else no_anchor(c["output_tok_s"]))
    return out


def machine() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = "no nvidia-smi"
    return f"{gpu}; {os.cpu_count()} CPU cores, {platform.platform()}"


def make_model(config: str, model_dir: Path) -> Path:
    """bench/random_model.py's folder, made in a child process (its CUDA context goes with it)."""
    code = ("import sys; sys.path.insert(0, 'bench'); from random_model import make_random_model; "
            f"make_random_model({config!r}, {str(model_dir)!r}, device='cuda')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return model_dir


def main() -> None:
    global BURST, CURVE, SETTLE_S, PROMPT_LEN, OUTPUT_LEN, COLD_ONLY, LONG_ONLY, LONG_PROMPT_LEN, LONG_PROMPT_RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"))
    p.add_argument("--model-dir", help="a model folder to use (made from --config when missing)")
    p.add_argument("--server", choices=("dormant", "vllm"), default="dormant")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dormant-bench-burst"))
    p.add_argument("--anchor", help="the vLLM run's JSON (--server vllm), for the figures")
    p.add_argument("--combine", nargs=2, metavar=("OURS", "VLLM"), help="only write the figures of two runs")
    p.add_argument("--out")
    p.add_argument("--log", help="the server's log (default WORKDIR/<server>.log)")
    p.add_argument("--burst", type=int, default=BURST)
    p.add_argument("--curve", default=",".join(map(str, CURVE)))
    p.add_argument("--settle", type=float, default=SETTLE_S)
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    p.add_argument("--long-prompt-len", type=int, default=LONG_PROMPT_LEN)
    p.add_argument("--long-prompt-runs", type=int, default=LONG_PROMPT_RUNS)
    p.add_argument("--cold-only", action="store_true", help="dormant: the cold bursts and the curve only")
    p.add_argument("--long-only", action="store_true",
                   help="the first request (dormant: the cold start), then the lone long prompt only")
    args = p.parse_args()
    BURST, SETTLE_S, PROMPT_LEN, OUTPUT_LEN = args.burst, args.settle, args.prompt_len, args.output_len
    LONG_PROMPT_LEN, LONG_PROMPT_RUNS = args.long_prompt_len, args.long_prompt_runs
    COLD_ONLY, LONG_ONLY = args.cold_only, args.long_only
    CURVE = tuple(int(n) for n in args.curve.split(","))
    if args.combine:
        ours, anchor = (json.loads(Path(f).read_text()) for f in args.combine)
        ours["anchor_run"] = {k: anchor.get(k) for k in ("date", "command", "machine")}
        ours["figures"] = figures(ours["ours"], anchor["ours"])
        write(result_path("burst", args.out or args.combine[0]), ours)
        print_figures(ours["figures"])
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else work / Path(args.config).stem
    if not (model_dir / "config.json").is_file():
        log(f"making {model_dir} from {args.config}")
        make_model(args.config, model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    bench = "burst" if args.server == "dormant" else "burst-vllm"
    out_path = result_path(bench, args.out)
    log_path = Path(args.log) if args.log else work / f"{args.server}.log"
    result = {"date": dt.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]), "machine": machine(),
              "server": args.server, "model_dir": str(model_dir), "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN,
              "burst": BURST, "settle_before_curve_s": SETTLE_S,
              "gil_switch_s": os.environ.get("DORMANT_GIL_SWITCH_S", "dormant's default"), "ours": {}}
    ours = result["ours"]
    anchor = json.loads(Path(args.anchor).read_text())["ours"] if args.anchor and Path(args.anchor).is_file() else None

    def save() -> None:
        if args.server == "dormant":
            result["figures"] = figures(ours, anchor)
        write(out_path, result)

    # `timeout` ends a run with SIGTERM: the servers (sessions of their own) must go with it,
    # or the next run finds the GPU's memory held
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    if args.server == "dormant":
        proc, base = start_dormant(model_dir, work, log_path)
    else:
        proc, base, ours["server_start_s"] = start_vllm(model_dir, log_path)
        log(f"vLLM ready after {ours['server_start_s']:.1f} s")
    try:
        asyncio.run((run_dormant if args.server == "dormant" else run_vllm)(base, vocab, ours, save))
    finally:
        ours["bench_s"] = time.perf_counter() - started
        stop(proc)
        if log_path.is_file():
            lines = log_path.read_text(errors="replace").splitlines()
            ours["server_log"] = [line[:300] for line in lines if any(k in line for k in LOG_KEYS)][-60:]
        save()
    if "figures" in result:
        print_figures(result["figures"])
    log(f"wrote {out_path}; the server's log: {log_path}")


if __name__ == "__main__":
    main()
