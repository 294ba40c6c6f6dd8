"""engine: vllm under dormant, beside vLLM alone: request -> first token from asleep, suspended
and stopped, and the GPU memory each tier holds. For the GPU machine (vLLM 0.26 from
../shared/vllm-on-device/ unpacked in /tmp/vsite; `bash bench/gpu_session.sh vllm` runs it):

    python bench/bench_vllm_engine.py --model /tmp/qwen3-8b --vllm-env PYTHONPATH=/tmp/vsite

--model: a model folder (bench/random_model.py makes the Qwen3-8B shape). The anchor is vLLM
alone on a port: `/wake_up` then the first token of a streamed request, and its restart to the
first token. --vllm-env KEY=VALUE is set for vLLM's processes only (vLLM's own fastapi and
starlette need not be the gateway's). --skip-alone leaves the anchor out (a second call's
rerun); --skip-dormant measures the anchor alone, and --anchor FILE takes it from such a run's
JSON (the two halves in two calls: bench/gpu_session.sh's VLLM_PART). The standby worker is
off: its CUDA context would blur the device's figures. Writes results/vllm-engine/latest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_process import free_port, wait_healthy
from report import no_anchor, print_figures, result_path, vs_floor, write

API_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]
SUSPEND_AFTER_S = 30  # after the asleep runs; counted from the last request, and the first sleep takes 13-17 s
PROMPT = "Say hello."  # a completion: the random model's tokenizer has no chat template


def gpu_used_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def first_token(base: str, model: str, headers: dict | None = None) -> float:
    """Seconds from sending a streamed completion request to its first text byte."""
    started = time.perf_counter()
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def vllm_env(args) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in args.vllm_env)


def vllm_alone(args) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [args.vllm_python, *API_SERVER, "--model", args.model, "--port", str(port), "--host", "127.0.0.1",
           "--served-model-name", "m", "--enable-sleep-mode", *args.vllm_flags]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **vllm_env(args)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_healthy(base, proc, timeout=1200)
        out = {"start_to_first_token_s": time.perf_counter() - started + first_token(base, "m"),
               "gpu_ready_gib": gpu_used_gib()}
        t = time.perf_counter()
        httpx.post(base + "/sleep", params={"level": "1"}, timeout=600).raise_for_status()
        out["first_sleep_s"] = time.perf_counter() - t
        httpx.post(base + "/wake_up", timeout=600).raise_for_status()
        wakes, sleeps = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            httpx.post(base + "/sleep", params={"level": "1"}, timeout=600).raise_for_status()
            sleeps.append(time.perf_counter() - t)
            out["gpu_asleep_gib"] = gpu_used_gib()
            t = time.perf_counter()
            httpx.post(base + "/wake_up", timeout=600).raise_for_status()
            wakes.append(time.perf_counter() - t + first_token(base, "m"))
        out.update(sleep_s=sleeps, wake_to_first_token_s=wakes)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def through_dormant(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    # `env K=V python -m ...`: vLLM's own PYTHONPATH, not the gateway's
    command = [*(["env", *args.vllm_env] if args.vllm_env else []), args.vllm_python, *API_SERVER]
    config = {"standby_worker": False,
              "models": {"m": {"source": args.model, "engine": "vllm", "vllm_command": command,
                               "engine_args": dict(a.lstrip("-").split("=", 1) for a in args.dormant_args) or {},
                               "sleep_after": "3s", "suspend_after": f"{SUSPEND_AFTER_S}s", "hibernate_after": -1,
                               "stop_after": -1, "start_timeout": 1200}}}
    (work / "dormant.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DORMANT_HOME": str(work / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(work / "dormant.yaml"),
                             "--port", str(port)], env=env)

    def replica() -> dict:
        return httpx.get(base + "/running", timeout=10).json()["running"][0]

    def state() -> str:
        r = replica()
        return "skipped" if r["suspend_skipped"] else r["state"]

    def wait(states: tuple[str, ...]) -> None:
        deadline = time.monotonic() + 900
        while state() not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {states} after 900 s")
            time.sleep(0.1)

    try:
        wait_healthy(base, proc, timeout=120)
        out = {"gpu_stopped_gib": gpu_used_gib(), "cold_to_first_token_s": first_token(base, "m")}
        out["gpu_ready_gib"] = gpu_used_gib()
        wakes = []
        for _ in range(args.runs + 1):  # the first sleep pins host memory; the worker did one before
            wait(("asleep",))
            out["gpu_asleep_gib"] = gpu_used_gib()
            wakes.append(first_token(base, "m"))
        out["asleep_to_first_token_s"] = wakes[1:]
        wait(("suspended", "skipped", "stopped"))  # skipped: /running says why; stopped: it failed
        r = replica()
        out["suspend_skipped"] = r["suspend_skipped"]
        if r["state"] == "suspended":
            out["suspension"] = r["suspension"]
            out["gpu_suspended_gib"] = gpu_used_gib()
            out["suspended_to_first_token_s"] = first_token(base, "m")
        httpx.post(base + "/unload", json={"model": "m"}, timeout=600).raise_for_status()  # returns once stopped
        out["stopped_to_first_token_s"] = first_token(base, "m")
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--vllm-python", default="python3")
    p.add_argument("--vllm-flags", nargs="*", default=[], help="extra flags for vLLM alone")
    p.add_argument("--dormant-args", nargs="*", default=[], help="engine_args as key=value, for dormant")
    p.add_argument("--vllm-env", nargs="*", default=[], help="KEY=VALUE for vLLM's processes (PYTHONPATH=/tmp/vsite)")
    p.add_argument("--skip-alone", action="store_true", help="no vLLM-alone anchor (a rerun of dormant's part)")
    p.add_argument("--skip-dormant", action="store_true", help="the vLLM-alone anchor only")
    p.add_argument("--anchor", help="the vLLM-alone figures from a --skip-dormant run's JSON, not measured again")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    result = {"date": dt.datetime.now(dt.UTC).isoformat(), "command": " ".join(sys.argv),
              "machine": platform.node(), "model": args.model}
    path = result_path("vllm-engine", args.out)
    if args.anchor:
        earlier = json.loads(Path(args.anchor).read_text())
        result["vllm_alone"] = alone = {**earlier["vllm_alone"], "measured": earlier["date"]}
    else:
        result["vllm_alone"] = alone = {} if args.skip_alone else vllm_alone(args)
    write(path, result)
    if args.skip_dormant:
        print(json.dumps(alone, indent=1))
        return
    result["dormant"] = ours = through_dormant(args)
    wake_ours, wake_alone = min(ours["asleep_to_first_token_s"]), min(alone.get("wake_to_first_token_s") or [None])
    result["figures"] = figures = {
        "asleep_to_first_token_s": vs_floor(wake_ours, "vLLM alone: /wake_up + first token", wake_alone,
                                            goal="<= vLLM alone + 0.020 s"),
        "suspended_to_first_token_s": vs_floor(ours.get("suspended_to_first_token_s"),
                                               "vLLM alone: /wake_up + first token", wake_alone, goal="<= 2 s"),
        "stopped_to_first_token_s": vs_floor(ours["stopped_to_first_token_s"], "vLLM alone: start + first token",
                                             alone.get("start_to_first_token_s")),
        "gpu_asleep_gib": vs_floor(ours["gpu_asleep_gib"], "vLLM alone, asleep", alone.get("gpu_asleep_gib")),
        "gpu_suspended_gib": no_anchor(ours.get("gpu_suspended_gib"), goal="0 GiB (the device's, all processes)"),
        "gpu_stopped_gib": no_anchor(ours["gpu_stopped_gib"], goal="0 GiB"),
    }
    write(path, result)
    print_figures(figures)


if __name__ == "__main__":
    main()
