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
--workdir. The server uses the bench's own store (--workdir/home), whose images are deleted
first so that the first start is a full cold start. `weights_source` in each phase table says
which path ran. JSON goes to bench/results/hibernate-<cpu|gpu>/latest.json (or --out),
rewritten after each part so a run cut short keeps what it measured; the gateway's and
workers' log to --log (default: in --workdir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gateway_process import free_port, wait_healthy
from report import print_figures, result_path, vs_anchor, vs_floor, write

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


def worker_stats(base: str) -> dict:
    """The worker's GET /stats, through the gateway's /running (the worker answers only the
    gateway): its cold_start phase table, the engine image's folder..."""
    return replica(base)["worker_stats"]


def worker_report(base: str) -> dict:
    return worker_stats(base)["cold_start"]


def through_gateway(model_dir: Path, engine_args: dict, home: Path, cold_cache: bool, log_path: Path,
                    warm_runs: int = 1, idle: float = 3.0) -> dict:
    """`idle`: seconds each restore's request waits once the model has hibernated. A model
    hibernates after minutes idle; in the first seconds after a restore, the zygote is still
    forking the standby worker that replaces the one the restore took (worker/standby.py)."""
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
            stats = worker_stats(base)
            out["cold_start_phases"], out["image_dir"] = stats["cold_start"], stats.get("image_dir")
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


def figures(result: dict) -> dict:
    """Each restore beside its floor and the anchors, from one run's result."""
    ours, fl, an = result["ours"], result.get("floors") or {}, result.get("anchors") or {}
    warm = ours.get("restore_warm_cache_to_first_token_s")
    fp = an.get("from_pretrained_to_first_token_s")
    return {
        "restore, image in page cache -> first token, s": vs_floor(
            warm, "buffered read of the image, 8 readers, no copy, s", fl.get("page_cache_read_s"), goal="<= 1.5 s"),
        "restore, page cache dropped -> first token, s": vs_floor(
            ours.get("restore_cold_cache_to_first_token_s"), "O_DIRECT read of the image (disk floor), s",
            fl.get("disk_floor_s"), goal="<= 1.2x the floor"),
        "restore (page cache) vs from_pretrained": vs_anchor(
            warm, "transformers from_pretrained -> first token, s", fp, higher_is_better=False, goal=">= 5x"),
        "restore (page cache) vs safetensors load_file": vs_anchor(
            warm, "safetensors.load_file of every shard to the device, s", an.get("safetensors_load_file_s"),
            higher_is_better=False),
        "full cold start (no image) -> first token, s": vs_anchor(
            ours.get("cold_start_to_first_token_s"), "transformers from_pretrained -> first token, s", fp,
            higher_is_better=False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--out", help="JSON path (default bench/results/hibernate-<cpu|gpu>/latest.json)")
    p.add_argument("--log", help="the gateway's and workers' log (default WORKDIR/gateway.log)")
    args = p.parse_args()
    workdir = Path(args.workdir)
    home = workdir / "home"  # the bench's own store: its images are ours to delete
    os.environ["DORMANT_HOME"] = str(home)
    if args.config:
        from random_model import make_random_model  # same folder

        model_dir = make_random_model(args.config, workdir / Path(args.config).stem, device=args.device)
    else:
        from dormant.store.models import materialize

        model_dir = materialize(args.source)
    from dormant.store.images import EngineImage
    from dormant.store.paths import images_dir

    shutil.rmtree(images_dir())  # the first start must be a full cold start
    can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)

    bench = f"hibernate-{'gpu' if args.device == 'cuda' else 'cpu'}"
    log_path = Path(args.log) if args.log else workdir / "gateway.log"
    result: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]),
                    "machine": machine(args.device), "model_dir": str(model_dir),
                    "device": args.device, "threads": args.threads, "idle_before_restore_s": args.idle,
                    "loadavg_before": os.getloadavg()}
    out = result_path(bench, args.out)
    result["ours"] = through_gateway(model_dir, {"device": args.device}, home, can_drop, log_path,
                                     args.warm_runs, args.idle)
    write(out, result)
    images = [Path(result["ours"]["image_dir"])] if result["ours"].get("image_dir") else list(images_dir().iterdir())
    image = EngineImage(images[0]) if len(images) == 1 else None
    result["floors"] = floors(image.folder, args.threads) if image is not None and image.exists() else None
    write(out, result)
    result["anchors"] = {} if args.skip_anchors else anchors(model_dir, args.device, can_drop)
    result["loadavg_after"] = os.getloadavg()
    result["figures"] = figures(result)
    write(out, result)
    print(json.dumps({k: result[k] for k in ("ours", "floors", "anchors")}, indent=2))
    print_figures(result["figures"])
    print(f"wrote {out}; the gateway's log: {log_path}")


if __name__ == "__main__":
    main()
