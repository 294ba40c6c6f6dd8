"""Many models, one GPU (issue 10): a Zipf trace over N models of one shape through `dormant serve`.

    python bench/bench_swap.py --config bench/configs/qwen3-8b.json --models 12 --requests 200 [--fp8 block]

One set of random bf16 weights (random_model.py), hard-linked into N model folders; default
settings plus the budgets. The trace: --requests requests, model ranks drawn from a Zipf law
(exponent --zipf) with a fixed seed, 1-4 in flight at a time, short prompts, 64-token answers.
Each request records the state its model was in when it was sent (/running) and its time to
the first token; /running and nvidia-smi are sampled each second (GPU, host RAM, disk held).

--fp8 block|channel: the weights in that FP8 format (fp8_model.py, made on the GPU without a
bf16 folder). It halves the folder and each engine image (the image holds the FP8 bytes: 9.4 GB
for the 8B shape against 16.4): on the GPU machine's 63 GB of free disk, two bf16 images fit
beside the folder and no request found its model hibernated; about five FP8 images do.

The hibernated tier's probe (--probes, 3): the trace's evictions may leave no request that
finds its model hibernated with its image still on disk (the disk budget's LRU deletes those
images first for the cold starts' new ones). After dormant's trace, the least recently used
idle models with an engine image are unloaded (/unload: the process ends, the image stays,
/running's tier "hibernated"), then each is requested alone: first token against the restore
the server's log times, the goal's <= restore + 0.2 s.

Anchor (--mode restart, or both by default): the same trace with every switch a full restart,
as llama-swap does it: one model at a time; a request for another waits for the running ones
to end, then every model is unloaded and the engine images deleted, so the next start is cold.

Writes bench/results/swap/latest.json (with --fp8: fp8-<format>.json beside it): the weights'
format and the model folder's bytes, failures, first-token p50 / p95 by state and by the
placer's tier, each switch's time, the probe, the memory samples, and the whole-trace time
beside the anchor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from gateway_process import free_port, wait_healthy
from report import RESULTS, no_anchor, result_path, vs_anchor, write

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_LEN = 64


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def base_model(config: str, work: Path, fp8: str | None, device: str | None = None) -> Path:
    """The one folder the N models link to: random bf16 weights, or with `fp8` a checkpoint in
    that format. On a GPU (the default `device` where nvidia-smi lists one) it is quantized
    there without a bf16 folder, in a child process (its CUDA context goes with it, as
    bench_scale's); on the CPU (`device` "cpu": the tests) from a bf16 folder, deleted once
    quantized."""
    stem = Path(config).stem
    if fp8 is None:
        from random_model import make_random_model  # same folder

        return make_random_model(config, work / "base" / stem)
    out = work / "base" / f"{stem}-fp8-{fp8}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out  # made by an earlier run (the other mode's call)
    if (device or ("cuda" if _has_gpu() else "cpu")) == "cuda":
        code = ("import sys; sys.path.insert(0, 'bench'); sys.path.insert(0, '.'); "
                "from fp8_model import make_random_fp8_model; "
                f"make_random_fp8_model({str(Path(config).resolve())!r}, {str(out.resolve())!r}, {fp8!r})")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        return out
    from fp8_model import make_fp8_model
    from random_model import make_random_model

    bf16 = make_random_model(config, work / "base" / f"{stem}-bf16", device="cpu")
    try:
        return make_fp8_model(bf16, out, fp8)
    finally:
        shutil.rmtree(bf16, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def model_folders(base: Path, n: int, work: Path) -> dict[str, Path]:
    """N folders whose files are hard links of `base`'s (no extra disk)."""
    out = {}
    for i in range(n):
        folder = work / "models" / f"m{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and not (folder / f.name).exists():
                os.link(f, folder / f.name)
        out[folder.name] = folder
    return out


def trace(models: list[str], n: int, zipf: float, seed: int) -> list[tuple[str, int]]:
    """(model, how many in flight with it) per request: Zipf ranks, 1-4 in flight."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(len(models))]
    return [(rng.choices(models, weights)[0], rng.randint(1, 4)) for _ in range(n)]


def start_server(folders: dict[str, Path], work: Path, mode: str,
                 gpu_budget: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = work / f"dormant-{mode}.yaml"
    budgets = {"budgets": {"gpu_memory": gpu_budget}} if gpu_budget else {}
    cfg.write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "store": str(work / f"home-{mode}"), **budgets,
        "models": {name: {"source": str(folder), "sleep_after": -1, "hibernate_after": -1, "stop_after": -1,
                          "start_timeout": "600s", "max_queue_wait": "600s"}
                   for name, folder in folders.items()},
    }))
    logf = open(work / f"server-{mode}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=60)
    return proc, url


class Run:
    def __init__(self, client: httpx.AsyncClient, url: str, mode: str, images: Path) -> None:
        self.client, self.url, self.mode, self.images = client, url, mode, images
        self.records: list[dict] = []
        self.samples: list[dict] = []
        self.current: str | None = None  # restart mode: the one model allowed to run
        self.in_flight = 0
        self.t0 = 0.0
        self.switch = asyncio.Lock()
        self.idle = asyncio.Event()
        self.idle.set()

    async def states(self) -> dict[str, dict]:
        r = await self.client.get(self.url + "/running", timeout=30)
        return {e["model"]: e for e in r.json()["running"]}

    async def restart_to(self, model: str) -> None:
        """llama-swap's switch: the running model's requests end, everything stops, images go."""
        async with self.switch:
            if self.current == model:
                return
            await self.idle.wait()
            await self.client.post(self.url + "/unload", timeout=600)
            shutil.rmtree(self.images, ignore_errors=True)
            self.current = model

    async def request(self, i: int, model: str, into: list[dict] | None = None) -> None:
        """One streamed request; its record (into `into`, default the trace's) has the model's
        state (`tier`) and the placer's tier (`placed`: device, asleep, hibernated...) when sent."""
        if self.mode == "restart":
            await self.restart_to(model)
        self.in_flight += 1
        self.idle.clear()
        entry = (await self.states())[model]
        body = {"model": model, "prompt": " ".join(f"t{100 + (i * 7 + k) % 1000}" for k in range(16)),
                "max_tokens": OUTPUT_LEN, "temperature": 0, "stream": True}
        sent = time.perf_counter()
        record = {"i": i, "model": model, "tier": entry["state"], "placed": entry.get("tier"), "sent": sent,
                  "sent_wall": time.time(), "ttft": None, "status": None}
        try:
            async with self.client.stream("POST", self.url + "/v1/completions", json=body, timeout=900) as r:
                record["status"] = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data:") and record["ttft"] is None and '"text"' in line:
                        record["ttft"] = time.perf_counter() - sent
        except httpx.HTTPError as e:
            record["status"] = f"{type(e).__name__}: {e}"
        record["e2e"] = time.perf_counter() - sent
        (self.records if into is None else into).append(record)
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    async def probe_hibernated(self, count: int, first_i: int) -> list[dict]:
        """After the trace, the hibernated tier on purpose (the trace's own evictions may leave
        no hibernated model whose image is still on disk when it is next asked for): up to
        `count` idle models with an engine image, least recently used first, are unloaded
        (/unload: the process ends, the image stays), then each is requested alone."""
        live = [e for e in (await self.states()).values()
                if e["state"] in ("ready", "asleep") and e["disk_bytes"] and not e["in_flight"]]
        records: list[dict] = []
        for i, e in enumerate(sorted(live, key=lambda e: e["last_used"] or "")[:count]):
            await self.client.post(self.url + "/unload", params={"model": e["model"]}, timeout=600)
            after = (await self.states())[e["model"]]
            log(f"probe: {e['model']} unloaded from {e['state']}: now {after['state']}, tier {after.get('tier')}, "
                f"{after['disk_bytes'] / 1e9:.2f} GB on disk")
            await self.request(first_i + i, e["model"], into=records)
        return records

    async def sample(self, t0: float) -> None:
        while True:
            try:
                entries = (await self.states()).values()
                gpu = (await asyncio.to_thread(
                    _smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits")).split()
                self.samples.append({
                    "t": round(time.perf_counter() - t0, 2),
                    "gpu_bytes": sum(e["gpu_bytes"] for e in entries), "host_bytes": sum(e["host_bytes"] for e in entries),
                    "disk_bytes": sum(e["disk_bytes"] for e in entries),
                    "nvidia_smi_used_mib": [int(x) for x in gpu if x.isdigit()],
                    "states": {e["model"]: e["state"] for e in entries}})
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(1.0)

    async def play(self, requests: list[tuple[str, int]], deadline: float | None = None) -> float:
        """Play the trace; past `deadline` seconds no new group is sent (a run that would
        outlive the device's call still leaves its figures, marked as cut short)."""
        t0 = self.t0 = time.perf_counter()
        sampler = asyncio.create_task(self.sample(t0))
        i = 0
        while i < len(requests):  # a group of 1-4 requests in flight together
            if deadline is not None and time.perf_counter() - t0 > deadline:
                log(f"{self.mode}: deadline of {deadline:.0f} s reached after {i} of {len(requests)} requests")
                break
            group = requests[i:i + requests[i][1]]
            await asyncio.gather(*(self.request(i + k, m) for k, (m, _) in enumerate(group)))
            i += len(group)
            if i % 20 < len(group):
                log(f"{self.mode}: {i} requests in {time.perf_counter() - t0:.0f} s")
        sampler.cancel()
        return time.perf_counter() - t0


def summary(records: list[dict], seconds: float, events: dict[str, list[tuple[float, str]]]) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["ttft"] is not None]
    switches = [{"i": r["i"], "model": r["model"], "from": r["tier"], "placed": r.get("placed"), "ttft": r["ttft"],
                 **switch_phases(r, events)}
                for r in ok if r["tier"] != "ready"]
    by_tier: dict[str, list[float]] = {}
    for r in ok:
        by_tier.setdefault(r["tier"], []).append(r["ttft"])

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    by_placed: dict[str, list[float]] = {}
    for r in ok:
        by_placed.setdefault(r.get("placed") or "?", []).append(r["ttft"])
    return {
        "seconds": seconds, "requests": len(records), "failures": len(records) - len(ok),
        "failed": [{k: r[k] for k in ("i", "model", "tier", "status")} for r in records if r not in ok][:20],
        "ttft_by_tier": {t: {"n": len(xs), "p50": statistics.median(xs), "p95": pct(xs, 0.95)}
                         for t, xs in by_tier.items()},
        "ttft_by_placed_tier": {t: {"n": len(xs), "p50": statistics.median(xs), "p95": pct(xs, 0.95)}
                                for t, xs in by_placed.items()},
        "switch_phases_by_tier": phases_by_tier(switches),
        "switches": switches,
    }


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ [\w.]+: model (\S+): (.*)$")
OP_BEGINS = ("-> starting", "-> waking")
OP_ENDS = re.compile(r"^(?:ready|awake) after ([\d.]+) s")


def server_events(log_path: Path) -> dict[str, list[tuple[float, str]]]:
    """The server log's lines about each model: (wall-clock time, text)."""
    events: dict[str, list[tuple[float, str]]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            t = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            events.setdefault(m[3], []).append((t, m[4]))
    return events


def switch_phases(record: dict, events: dict[str, list[tuple[float, str]]]) -> dict:
    """Where a switch's time went, from the server's log: `wait` from the request to the start
    or wake beginning (room being made), `op` the start, restore or wake as the server timed it,
    `over_op` first token less the op (the goal for a hibernated model: <= 0.2 s). Empty when
    the log has no op for it (another request's switch already under way, say)."""
    began = None
    for t, text in events.get(record["model"], []):
        if t < record["sent_wall"] - 1.0:
            continue
        if text.endswith(OP_BEGINS):
            began = t
        elif (m := OP_ENDS.match(text)) and began is not None:
            op = float(m[1])
            return {"wait": round(max(0.0, began - record["sent_wall"]), 3), "op": op,
                    "over_op": round(record["ttft"] - op, 3)}
    return {}


def phases_by_tier(switches: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for tier in sorted({s["from"] for s in switches}):
        timed = [s for s in switches if s["from"] == tier and "op" in s]
        if timed:
            out[tier] = {"n": len(timed), **{f"{k}_p50": statistics.median(s[k] for s in timed)
                                             for k in ("wait", "op", "over_op")}}
    return out


async def run_mode(mode: str, folders: dict[str, Path], requests, work: Path, deadline: float | None,
                   gpu_budget: str | None = None, probes: int = 0) -> dict:
    proc, url = start_server(folders, work, mode, gpu_budget if mode == "placed" else None)
    try:
        async with httpx.AsyncClient() as client:
            run = Run(client, url, mode, work / f"home-{mode}" / "images")
            seconds = await run.play(requests, deadline)
            metrics = (await client.get(url + "/metrics")).text
            probed = await run.probe_hibernated(probes, len(requests)) if mode == "placed" and probes else []
        events = server_events(work / f"server-{mode}.log")
        return {**summary(run.records, seconds, events), "cut_short": len(run.records) < len(requests), "samples": run.samples,
                "done_at": done_at(run.records, run.t0),
                "evictions": [line for line in metrics.splitlines() if line.startswith("dormant:evictions_total")],
                **({"hibernated_probe": probe_summary(probed, events)} if probes and mode == "placed" else {})}
    finally:
        stop_server(proc)


def probe_summary(records: list[dict], events: dict[str, list[tuple[float, str]]]) -> dict:
    """The probe's requests: each with its phases (switch_phases), and the p50s of those that
    found their model hibernated as meant (no process, its image on disk)."""
    out = [{k: r[k] for k in ("model", "tier", "placed", "status", "ttft")} | switch_phases(r, events)
           if r["status"] == 200 and r["ttft"] is not None else {k: r[k] for k in ("model", "tier", "placed", "status")}
           for r in records]
    hits = [r for r in out if r.get("placed") == "hibernated" and "op" in r]
    return {"requests": out, "n": len(hits), **{f"{k}_p50": statistics.median(r[k] for r in hits)
                                                for k in ("ttft", "op", "over_op", "wait") if hits}}


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: twelve GPU workers draining must not eat the device's call (a run
    cut at its deadline lost its figures to a 120 s wait)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def done_at(records: list[dict], t0: float) -> list[float]:
    """Seconds from the trace's start until requests 0..k had all ended, per k: two modes cut
    short at different points compare on the prefix both finished."""
    ends = {r["i"]: r["sent"] + r["e2e"] - t0 for r in records}
    out, last = [], 0.0
    for i in range(len(ends)):
        if i not in ends:
            break
        last = max(last, ends[i])
        out.append(round(last, 3))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"))
    p.add_argument("--models", type=int, default=12)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("placed", "restart", "both"), default="both")
    p.add_argument("--fp8", choices=("block", "channel"),
                   help="the models' weights in this FP8 format (fp8_model.py); default: bf16")
    p.add_argument("--workdir", help="default /tmp/bench-swap, with --fp8 /tmp/bench-swap-fp8-FORMAT (one "
                   "format's model folders and images never mixed with another's)")
    p.add_argument("--deadline", type=float, help="seconds per mode after which no new request is sent")
    p.add_argument("--gpu-budget", help="budgets.gpu_memory for dormant's mode (e.g. 45GiB: two 8B models "
                   "run, and the host budget's room left holds others asleep); default: the device's")
    p.add_argument("--merge", action="append", default=[],
                   help="an earlier result file of the same trace and weights: its modes this run does not "
                        "run are kept (the two modes in two device calls)")
    p.add_argument("--probes", type=int, default=3,
                   help="after dormant's trace: this many idle models with an engine image unloaded, then requested "
                        "(the hibernated tier's switch, which the trace may never hit); 0: none")
    p.add_argument("--out", help="default bench/results/swap/latest.json, with --fp8 fp8-FORMAT.json beside it")
    args = p.parse_args()
    if args.fp8 and not _has_gpu():  # the folder could be made, but no request would be answered
        sys.exit("--fp8: dormant serves FP8 checkpoints on a GPU only (its CPU engine runs bf16/fp32 weights), "
                 "and nvidia-smi lists no GPU here")
    weights = f"fp8-{args.fp8}" if args.fp8 else "bf16"
    work = Path(args.workdir or ("/tmp/bench-swap" + (f"-{weights}" if args.fp8 else "")))

    base = base_model(args.config, work, args.fp8)
    log(f"base model {base}: {weights}, {folder_bytes(base) / 1e9:.2f} GB")
    folders = model_folders(base, args.models, work)
    requests = trace(sorted(folders), args.requests, args.zipf, args.seed)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "machine": _machine(), "trace": {"models": args.models, "requests": args.requests,
                                               "zipf": args.zipf, "seed": args.seed},
              "weights": weights, "model_folder_bytes": folder_bytes(base), "gpu_budget": args.gpu_budget}
    out = result_path("swap", args.out or (RESULTS / "swap" / f"{weights}.json" if args.fp8 else None))
    for earlier in args.merge:
        merge(result, earlier)
    for mode in (("placed", "restart") if args.mode == "both" else (args.mode,)):
        log(f"{mode}: {args.requests} requests over {args.models} models")
        result[mode] = asyncio.run(run_mode(mode, folders, requests, work, args.deadline, args.gpu_budget, args.probes))
        log(f"{mode}: {result[mode]['seconds']:.1f} s, {result[mode]['failures']} failures, "
            f"{json.dumps(result[mode]['ttft_by_tier'])}")
        if "hibernated_probe" in result[mode]:
            log(f"{mode}: hibernated probe {json.dumps({k: v for k, v in result[mode]['hibernated_probe'].items() if k != 'requests'})}")
        write(out, {**result, "figures": _figures(result)})


def merge(result: dict, earlier_path: str) -> None:
    """Keep the modes of an earlier run of the same trace and weights that this run does not run
    (it runs them again over them); another trace or other weights end the run, naming them."""
    earlier = json.loads(Path(earlier_path).read_text())
    if earlier.get("trace") != result["trace"]:
        sys.exit(f"--merge {earlier_path}: {earlier.get('trace')} is another trace than {result['trace']}")
    if earlier.get("weights", "bf16") != result["weights"]:  # results before --fp8 were bf16
        sys.exit(f"--merge {earlier_path}: its weights are {earlier.get('weights', 'bf16')}, this run's "
                 f"{result['weights']}")
    result.update({m: earlier[m] for m in ("placed", "restart") if m in earlier})
    result["gpu_budget"] = earlier["gpu_budget"] if "placed" in earlier else result["gpu_budget"]


def _figures(result: dict) -> dict:
    placed, restart = result.get("placed"), result.get("restart")
    tiers = (placed or {}).get("ttft_by_tier", {})
    figures = {
        "failures": no_anchor(placed["failures"] if placed else None, goal="0"),
        "asleep_to_first_token_p50": no_anchor(tiers.get("asleep", {}).get("p50"), goal="<= 0.5 s"),
        "hibernated_to_first_token_p50": no_anchor(tiers.get("hibernated", {}).get("p50"),
                                                   goal="<= restore time + 0.2 s"),
        "hibernated: first token less its restore, p50": no_anchor(
            (placed or {}).get("switch_phases_by_tier", {}).get("hibernated", {}).get("over_op_p50"), goal="<= 0.2 s"),
    }
    probe = (placed or {}).get("hibernated_probe")
    if probe:
        figures["hibernated, probe after the trace: first token p50"] = no_anchor(probe.get("ttft_p50"))
        figures["hibernated, probe after the trace: restore p50"] = no_anchor(probe.get("op_p50"))
        figures["hibernated, probe after the trace: first token less its restore, p50"] = no_anchor(
            probe.get("over_op_p50"), goal="<= 0.2 s")
    if placed and restart:
        both = min(len(placed["done_at"]), len(restart["done_at"]))
        if both:  # the trace, or the prefix of it that both runs finished before their deadline
            figures[f"seconds for the trace's first {both} requests"] = vs_anchor(
                placed["done_at"][both - 1], "every switch a full restart (llama-swap)",
                restart["done_at"][both - 1], higher_is_better=False)
    return figures


def _machine() -> str:
    gpus = _smi("--query-gpu=name,memory.total", "--format=csv,noheader").strip().replace("\n", "; ")
    return f"{gpus or 'no GPU'}; {os.cpu_count()} CPU cores"


def _has_gpu() -> bool:
    return bool(_smi("--list-gpus").strip())


def _smi(*args: str) -> str:
    """nvidia-smi's output, or "" where there is none (a machine without a GPU)."""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


if __name__ == "__main__":
    main()
