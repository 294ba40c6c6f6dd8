"""Hibernation benchmark: restore from the engine image -> first token, beside its floor and anchors.

    python bench/bench_hibernate.py                                   # CPU, SmolLM2 (here)
    python bench/bench_hibernate.py --config bench/configs/qwen3-8b.json --device cuda   # GPU machine

All in one run, through a real `dormant serve` (gateway + zygote + worker, HTTP, SSE):
  full cold start -> first token   no image: safetensors load, warm-up, then the image is written
  restore -> first token (warm)    after hibernation (worker gone), image in the page cache
  restore -> first token (cold)    the same after `echo 3 > /proc/sys/vm/drop_caches` (root only;
                                   skipped with a note otherwise)
  disk floor                       parallel O_DIRECT read of the image file (no copy, no checksum),
                                   the best of --threads x 16 MiB and the GPU restore's 16 x 8 MiB
  page-cache read                  the same, buffered, file cached
Anchors in fresh processes, same model files: transformers `from_pretrained` -> first token, and
`safetensors.load_file` of every shard (to the device). Ratios: restore / floor, anchor / restore.
The worker's own phase table (GET /stats cold_start) is recorded for the cold start and restore.
--warm-runs N repeats the warm restore (all N recorded, the lower median is the figure);
--skip-anchors leaves the anchors out (a restore-only rerun: no ratios to them); --idle S is how
long the model stays hibernated before each restore's request (default 3 s).

--config builds a random-weight model from an HF config.json (bench/random_model.py) once, in
--workdir. `weights_source` in each phase table says which path ran. JSON goes to --out
(default bench/results/hibernate-<cpu|gpu>-<date>.json), rewritten after each part so a run
cut short keeps what it measured; the gateway's and workers' log goes beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gateway_process import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TF_FIRST_TOKEN = r"""
import sys, time
t0 = float(sys.argv[2])
import torch
from transformers import AutoModelForCausalLM
dev = sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                                             device_map=dev)
ids = torch.tensor([[1, 2, 3, 4]], device=dev)
model.generate(ids, max_new_tokens=1, do_sample=False)
if dev == "cuda":
    torch.cuda.synchronize()
print(time.time() - t0)
"""
ST_LOAD = r"""
import sys, time, glob
t0 = float(sys.argv[2])
from safetensors.torch import load_file
n = 0
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    n += sum(t.numel() * t.element_size() for t in load_file(f, device=sys.argv[3]).values())
if sys.argv[3] == "cuda":
    import torch; torch.cuda.synchronize()
print(time.time() - t0, n)
"""


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def first_token(base: str, keep_alive) -> float:
    body = {"model": "m", "prompt": "t1 t2 t3 t4", "max_tokens": 1, "temperature": 0, "stream": True,
            "keep_alive": keep_alive}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token")


def replica(base: str) -> dict:
    return httpx.get(f"{base}/running", timeout=10).json()["running"][0]


def wait_state(base: str, state: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = replica(base)
        if r["state"] == state:
            return r
        time.sleep(0.05)
    raise TimeoutError(f"never {state}")


def worker_report(base: str) -> dict:
    r = replica(base)
    return httpx.get(f"http://127.0.0.1:{r['port']}/stats", timeout=30).json()["cold_start"]


def through_gateway(model_dir: Path, engine_args: dict, home: Path, cold_cache: bool, log_path: Path,
                    warm_runs: int = 1, idle: float = 3.0) -> dict:
    """`idle`: seconds each restore's request waits once the model has hibernated. A model
    hibernates after minutes idle; in the first seconds after a restore, the zygote is still
    forking the standby worker that replaces the one the restore took (worker/standby.py)."""
    from bench_cpu import free_port  # same folder

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "dormant.yaml"
        cfg.write_text(json.dumps({"port": port, "models": {"m": {
            "source": str(model_dir), "engine_args": engine_args, "sleep_after": -1,
            "hibernate_after": "10m", "stop_after": -1}}}))
        env = {**os.environ, "DORMANT_HOME": str(home)}
        log = open(log_path, "w")
        gw = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                              env=env, stderr=log)
        out: dict = {}
        try:
            wait_healthy(base, gw)
            time.sleep(15)  # let the zygote come up (it imports torch), as on a server running a while
            out["cold_start_to_first_token_s"] = first_token(base, -1)
            out["cold_start_phases"] = worker_report(base)
            first_token(base, 0)  # keep_alive 0: hibernate once it ends (the image is written first)
            wait_state(base, "hibernated")
            warm = []  # (seconds, phases) of each restore with the image in the page cache
            for _ in range(warm_runs):
                time.sleep(idle)
                warm.append((first_token(base, -1), worker_report(base)))
                first_token(base, 0)
                wait_state(base, "hibernated")
            median = sorted(warm, key=lambda run: run[0])[(len(warm) - 1) // 2]  # the lower median: a real run
            out["restore_warm_cache_to_first_token_s"], out["restore_warm_cache_phases"] = median
            out["restore_warm_cache_runs_s"] = [seconds for seconds, _ in warm]
            if cold_cache and not drop_caches():
                out["restore_cold_cache_note"] = "skipped: /proc/sys/vm/drop_caches not writable (run as root)"
            elif cold_cache:
                time.sleep(idle)
                out["restore_cold_cache_to_first_token_s"] = first_token(base, -1)
                out["restore_cold_cache_phases"] = worker_report(base)
                first_token(base, 0)
                wait_state(base, "hibernated")
        finally:
            gw.terminate()
            gw.wait(timeout=120)
            log.close()
    return out


def machine(device: str) -> str:
    import platform

    import torch

    gpu = f"{torch.cuda.get_device_name()}, " if device == "cuda" and torch.cuda.is_available() else ""
    return f"{gpu}{os.cpu_count()} CPU cores, {platform.platform()}; torch {torch.__version__}"


def floors(image_dir: Path, threads: int) -> dict:
    from dormant.store.image_reader import read_image
    from dormant.store.images import EngineImage

    image = EngineImage(image_dir)
    manifest = image.read_manifest()
    discard = lambda offset, address, n: None  # noqa: E731 - read only
    out = {"image_bytes": manifest.nbytes}
    # The floor is the best of two shapes: `threads` readers of whole checksum blocks, and the
    # GPU restore's own (16 readers of 8 MiB; engine_image.READ_BYTES)
    tries = {}
    for n, read_bytes in ((threads, None), (16, 8 << 20)):
        s = read_image(image.data_path, manifest, None, deliver=discard, threads=n, direct=True, verify=False,
                       read_bytes=read_bytes)
        tries[f"{n} readers x {(read_bytes or int(manifest.checksum['block_bytes'])) >> 20} MiB"] = s.seconds
        if "disk_floor_s" not in out or s.seconds < out["disk_floor_s"]:
            out["disk_floor_s"], out["disk_floor_gbps"], out["disk_floor_direct"] = s.seconds, s.gbps, s.direct
    out["disk_floor_tries_s"] = tries
    read_image(image.data_path, manifest, None, deliver=discard, threads=threads, direct=False, verify=False)
    s = read_image(image.data_path, manifest, None, deliver=discard, threads=threads, direct=False, verify=False)
    out["page_cache_read_s"], out["page_cache_read_gbps"] = s.seconds, s.gbps
    s = read_image(image.data_path, manifest, None, deliver=discard, threads=threads, direct=False, verify=True)
    out["page_cache_read_verified_s"] = s.seconds
    return out


def anchors(model_dir: Path, device: str, cold_cache: bool) -> dict:
    out = {}
    for name, script in (("from_pretrained_to_first_token_s", TF_FIRST_TOKEN), ("safetensors_load_file_s", ST_LOAD)):
        for cache in ("warm", "cold") if cold_cache else ("warm",):
            if cache == "cold" and not drop_caches():
                continue
            t0 = time.time()
            text = subprocess.check_output([sys.executable, "-c", script, str(model_dir), str(t0), device],
                                           stderr=subprocess.DEVNULL, text=True)
            out[f"{name}_{cache}_cache" if cache == "cold" else name] = float(text.split()[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="builtin:smollm2")
    p.add_argument("--config", help="HF config.json: build a random-weight model from it (GPU bench)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dormant-bench-hibernate"))
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--warm-runs", type=int, default=1,
                   help="restores with the image in the page cache; the (lower) median is the figure")
    p.add_argument("--idle", type=float, default=3.0,
                   help="seconds hibernated before each restore (the zygote replaces its standby worker)")
    p.add_argument("--skip-anchors", action="store_true",
                   help="no from_pretrained / load_file anchors (a restore-only rerun; no ratios to them)")
    p.add_argument("--out", help="JSON path (default bench/results/hibernate-<cpu|gpu>-<date>.json); "
                                 "the gateway's log goes beside it")
    args = p.parse_args()
    os.environ.setdefault("DORMANT_HOME", str(Path(args.workdir) / "home"))
    home = Path(os.environ["DORMANT_HOME"])
    if args.config:
        from bench.random_model import make_random_model

        model_dir = make_random_model(args.config, Path(args.workdir) / Path(args.config).stem, device=args.device)
    else:
        from dormant.store.models import materialize

        model_dir = materialize(args.source)
    from dormant.engines.native.config import EngineConfig
    from dormant.store.images import EngineImage, image_dir_for

    engine_args = {"device": args.device}
    config = EngineConfig.from_args(model_dir, engine_args)
    image_dir = image_dir_for(model_dir, config.dtype, config.device)
    EngineImage(image_dir).delete()  # the first start must be a full cold start
    can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)

    result: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]),
                    "machine": machine(args.device), "model_dir": str(model_dir),
                    "device": args.device, "threads": args.threads, "idle_before_restore_s": args.idle,
                    "loadavg_before": os.getloadavg()}
    out = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"hibernate-{'gpu' if args.device == 'cuda' else 'cpu'}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result["ours"] = through_gateway(model_dir, engine_args, home, can_drop, out.with_suffix(".gateway.log"),
                                     args.warm_runs, args.idle)
    out.write_text(json.dumps(result, indent=2))
    result["floors"] = floors(image_dir, args.threads) if EngineImage(image_dir).exists() else None
    out.write_text(json.dumps(result, indent=2))
    result["anchors"] = {} if args.skip_anchors else anchors(model_dir, args.device, can_drop)
    result["loadavg_after"] = os.getloadavg()
    ours, fl, an = result["ours"], result["floors"] or {}, result["anchors"]
    warm = ours.get("restore_warm_cache_to_first_token_s")
    cold = ours.get("restore_cold_cache_to_first_token_s")
    result["ratios"] = {
        "restore_cold_cache / disk_floor": cold / fl["disk_floor_s"] if cold and fl else None,
        "from_pretrained / restore_warm_cache": an["from_pretrained_to_first_token_s"] / warm if warm and an else None,
        "full_cold_start / restore_warm_cache": ours["cold_start_to_first_token_s"] / warm if warm else None,
        "safetensors_load_file / restore_warm_cache": an["safetensors_load_file_s"] / warm if warm and an else None,
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ours", "floors", "anchors", "ratios")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
