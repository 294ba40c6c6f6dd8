"""bench_gpu.py's workload (random prompts of PROMPT_LEN tokens, OUTPUT_LEN greedy tokens each)
and its measurements through `dormant serve`: the gateway's OpenAI API, its /running, and the
worker's /sleep and /wake_up routes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from gateway_process import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, OUTPUT_LEN = 512, 128
SLEEP_AFTER_S = 3
WORKER_TOKEN = "bench-" + os.urandom(16).hex()
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, PROMPT_LEN), generator=g).tolist()


# -- the server -----------------------------------------------------------------------------------

def start_server(name: str, model_dir: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = work / f"dormant-{name}.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "host": "127.0.0.1", "port": port, "store": str(work / "home"),
        "models": {name: {
            "source": str(model_dir), "engine": "native", "engine_args": {"device": "cuda"},
            "sleep_after": f"{SLEEP_AFTER_S}s", "stop_after": -1, "start_timeout": "600s",
            "max_concurrent_requests": 128, "max_queue": 512,
        }},
    }))
    # the workers' secret, ours to choose, so the bench may call a worker's own routes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DORMANT_WORKER_TOKEN": WORKER_TOKEN}
    logf = open(work / f"server-{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)],
                            stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=60)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{e}: {(work / f'server-{name}.log').read_text()[-3000:]}") from None
    return proc, url


async def complete(client: httpx.AsyncClient, url: str, name: str, prompt, max_tokens: int) -> dict:
    """A streamed completion: time to first token, token times, count."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - t0, "total": last - t0, "decode": last - first, "tokens": tokens}


async def throughput(url: str, name: str, vocab: int, concurrency: int) -> dict:
    ps = prompts(concurrency, vocab, seed=1000 + concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        t = time.perf_counter()
        rs = await asyncio.gather(*(complete(client, url, name, p, OUTPUT_LEN) for p in ps))
        wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in rs)
    return {"concurrency": concurrency, "output_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "ttft_median_s": statistics.median(r["ttft"] for r in rs)}


async def decode_figures(url: str, name: str, vocab: int, roofline: float, anchor: dict) -> dict:
    async with httpx.AsyncClient() as client:
        await complete(client, url, name, prompts(1, vocab, 7)[0], 8)  # warm
        r = await complete(client, url, name, prompts(1, vocab, 8)[0], OUTPUT_LEN)
    b1 = (r["tokens"] - 1) / r["decode"]
    out = {"batch1_decode_tok_s": b1, "batch1_pct_of_roofline": 100 * b1 / roofline,
           "batch1_ttft_s_512_prompt": r["ttft"]}
    for c in (1, 8, 64):
        t = await throughput(url, name, vocab, c)
        out[f"concurrent_{c}"] = t
        log(f"  {c:>2} concurrent: {t['output_tok_s']:.0f} output tok/s (ttft median {t['ttft_median_s']:.3f} s)")
    out["concurrent_1_vs_hf_batch1"] = out["concurrent_1"]["output_tok_s"] / anchor["batch_1_tok_s"]
    out["concurrent_64_vs_hf_static64"] = out["concurrent_64"]["output_tok_s"] / anchor["batch_64_tok_s"]
    log(f"  batch-1 decode {b1:.1f} tok/s = {out['batch1_pct_of_roofline']:.0f}% of roofline {roofline:.0f}; "
        f"64 concurrent = {out['concurrent_64_vs_hf_static64']:.1f}x HF static 64")
    return out


def gpu_memory_of(pid_root: int) -> int | None:
    """GPU memory (bytes) of the worker: nvidia-smi's per-process figure, children of the server."""
    try:
        import psutil

        pids = {p.pid for p in psutil.Process(pid_root).children(recursive=True)} | {pid_root}
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        used = [int(line.split(",")[1]) for line in out.strip().splitlines() if int(line.split(",")[0]) in pids]
        return sum(used) << 20 if used else 0
    except Exception as e:  # noqa: BLE001 - a missing figure must not stop the bench
        log(f"  nvidia-smi: {e}")
        return None


async def running(url: str) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(url + "/running")).json()["running"][0]


async def sleep_cycles(url: str, name: str, proc: subprocess.Popen, cycles: int) -> dict:
    out = []
    for i in range(cycles):
        t = time.perf_counter()
        while (await running(url))["state"] != "asleep":
            if time.perf_counter() - t > 60:
                raise RuntimeError("the replica did not go to sleep")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        device_used = torch.cuda.mem_get_info()
        mem = gpu_memory_of(proc.pid)
        async with httpx.AsyncClient() as client:
            r = await complete(client, url, name, [11, 12, 13, 14, 15, 16, 17, 18], 8)
        out.append({"ttft_after_sleep_s": r["ttft"], "gpu_memory_asleep_bytes": mem,
                    "device_used_asleep_bytes": device_used[1] - device_used[0]})
        log(f"  cycle {i}: gateway request -> first token after sleep {r['ttft']:.3f} s; "
            f"worker GPU memory asleep {(mem or 0) / 2**30:.2f} GiB")
    return {"cycles": out, "ttft_after_sleep_median_s": statistics.median(c["ttft_after_sleep_s"] for c in out)}


async def direct_sleep_wake(url: str, name: str, cycles: int) -> dict:
    """Sleep and wake on the worker itself (its /sleep, /wake_up), timed by the caller; the
    first token after each wake is asked through the gateway."""
    rep = await running(url)
    worker = f"http://127.0.0.1:{rep['port']}"
    sleeps, wakes, wake_calls = [], [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(cycles):
            t = time.perf_counter()
            (await client.post(worker + "/sleep", params={"level": "1"}, headers=WORKER_AUTH)).raise_for_status()
            sleeps.append(time.perf_counter() - t)
            t = time.perf_counter()
            (await client.post(worker + "/wake_up", headers=WORKER_AUTH)).raise_for_status()
            wake_calls.append(time.perf_counter() - t)
            r = await complete(client, url, name, [11, 12, 13], 1)  # via the gateway: keeps its idle timer fresh
            wakes.append(wake_calls[-1] + r["ttft"])
    return {"sleep_s": statistics.median(sleeps), "wake_up_call_s": statistics.median(wake_calls),
            "wake_to_first_token_s": statistics.median(wakes), "samples": {"sleep": sleeps, "wake": wakes}}


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except Exception:  # noqa: BLE001
        os.killpg(proc.pid, signal.SIGKILL)
