"""The seed's scale (issue 12): the Qwen3-32B shape in FP8 (block format, ~34 GB, the size class
of the seed's 27B FP8 model) through `dormant serve`, request -> first token of a lone request:

  cold             the first request starts the model: safetensors in the page cache (just
                   written), no engine image, no compiled kernels; the image is written after it
  asleep           after a request with keep_alive 0 (weights in pinned host RAM), --runs times
  restore warm     after POST /unload (the worker gone, the image kept), image in the page cache
  restore cold     the same after `echo 3 > /proc/sys/vm/drop_caches` (root only)

beside the seed's snapshot restore on Modal (70 s, the figure the seed recorded; not measured
here) and, with --vllm (vLLM 0.26 in PYTHONPATH), vLLM's own start on this GPU: the server's
start to its first token (--enable-sleep-mode, its compile cache cold), and its wake from
/sleep?level=1.

    PYTHONPATH=. python3 bench/bench_scale.py [--config bench/configs/qwen3-32b.json] [--vllm]

Disk: the FP8 folder and its engine image are ~34 GB each, together more than the GPU machine's
64 GiB disk, so the folder goes under --model-root (default /dev/shm when it has room: RAM, as
a page-cached folder would be). The model is made on the GPU from the config with random
weights (bench/fp8_model.py, no bf16 folder). Writes results/scale/latest.json (or --out) after
each part.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_burst  # noqa: E402
from bench_burst import log, machine, one_token, replica, start_dormant, start_vllm, stop, wait_until  # noqa: E402
from bench_hibernate import drop_caches  # noqa: E402
from report import no_anchor, print_figures, result_path, vs_anchor, write  # noqa: E402

SEED_MODAL_RESTORE_S = 70.0  # the seed's 27B FP8 snapshot restore on Modal, as it recorded it
DEFAULT_CONFIG = ROOT / "bench/configs/qwen3-32b.json"


def model_root(requested: str | None, work: Path, need_bytes: int) -> Path:
    """--model-root, else /dev/shm when it has room for the model and 8 GiB more, else the workdir."""
    if requested:
        return Path(requested)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes + (8 << 30):
        return shm / "dormant-bench-scale"
    return work


def fp8_bytes(config: dict) -> int:
    """The block-FP8 checkpoint's size: projections 1 byte a weight, embeddings and head bf16."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    per_layer = h * (2 * q + 2 * kv) + 3 * h * config["intermediate_size"]
    return layers * per_layer + 2 * vocab * h * (1 if config.get("tie_word_embeddings") else 2)


def make_model(config: Path, model_dir: Path) -> None:
    """fp8_model.make_random_fp8_model in a child process (its CUDA context goes with it)."""
    code = ("import sys; sys.path.insert(0, 'bench'); sys.path.insert(0, '.'); "
            "from fp8_model import make_random_fp8_model; "
            f"make_random_fp8_model({str(config)!r}, {str(model_dir)!r}, 'block')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


async def run_dormant(base: str, vocab: int, out: dict, save, runs: int, can_drop: bool) -> None:
    seed = iter(range(1000, 10_000))
    log("cold: the first request starts the model")
    out["cold_start_to_first_token_s"] = await one_token(base, vocab, next(seed))
    out["cold_start_worker"] = {k: (replica(base).get("worker_stats") or {}).get(k)
                                for k in ("weights_bytes", "kv_cache_bytes", "weights_source")}
    log(f"  {out['cold_start_to_first_token_s']:.2f} s; {out['cold_start_worker']}")
    save()

    out["asleep_to_first_token_s"] = []
    for _ in range(runs):
        await one_token(base, vocab, next(seed), keep_alive=0)  # the first tier (asleep) at once
        await asyncio.to_thread(wait_until, lambda: replica(base)["state"] == "asleep", 300, "asleep")
        out["asleep_to_first_token_s"].append(await one_token(base, vocab, next(seed)))
        log(f"  asleep -> first token {out['asleep_to_first_token_s'][-1]:.3f} s")
    save()

    async def unload() -> None:  # waits for the image write
        async with httpx.AsyncClient(timeout=900) as c:
            (await c.post(base + "/unload", json={"model": bench_burst.MODEL})).raise_for_status()

    out["restore_warm_to_first_token_s"] = []
    for _ in range(runs):
        await unload()
        out["restore_warm_to_first_token_s"].append(await one_token(base, vocab, next(seed)))
        log(f"  restore (page cache warm) -> first token {out['restore_warm_to_first_token_s'][-1]:.2f} s; "
            f"weights from {(replica(base).get('worker_stats') or {}).get('weights_source')}")
    save()
    if can_drop:
        await unload()
        drop_caches()
        out["restore_cold_to_first_token_s"] = await one_token(base, vocab, next(seed))
        log(f"  restore (page cache dropped) -> first token {out['restore_cold_to_first_token_s']:.2f} s")
    else:
        out["restore_cold_note"] = "skipped: /proc/sys/vm/drop_caches not writable (run as root)"
    save()


async def run_vllm(base: str, vocab: int, out: dict, runs: int) -> None:
    seed = iter(range(1000, 10_000))
    out["first_token_after_ready_s"] = await one_token(base, vocab, next(seed))
    out["start_to_first_token_s"] = out["server_start_s"] + out["first_token_after_ready_s"]
    out["wake_to_first_token_s"] = []
    async with httpx.AsyncClient(timeout=600) as c:
        for _ in range(runs):
            (await c.post(base + "/sleep", params={"level": "1"})).raise_for_status()
            t0 = time.perf_counter()
            (await c.post(base + "/wake_up")).raise_for_status()
            woke = time.perf_counter() - t0
            out["wake_to_first_token_s"].append(woke + await one_token(base, vocab, next(seed)))
            log(f"  vLLM wake -> first token {out['wake_to_first_token_s'][-1]:.3f} s")


def median(values: list[float] | None) -> float | None:
    return sorted(values)[(len(values) - 1) // 2] if values else None


def figures(ours: dict, vllm: dict | None) -> dict:
    v = vllm or {}
    cold = ours.get("cold_start_to_first_token_s")
    return {
        "asleep -> first token, s (median)": vs_anchor(
            median(ours.get("asleep_to_first_token_s")), "vLLM 0.26 wake from sleep level 1 -> first token, s",
            median(v.get("wake_to_first_token_s")), higher_is_better=False),
        "restore, image in page cache -> first token, s (median)": vs_anchor(
            median(ours.get("restore_warm_to_first_token_s")), "the seed's snapshot restore on Modal (recorded), s",
            SEED_MODAL_RESTORE_S, higher_is_better=False),
        "restore, page cache dropped -> first token, s": vs_anchor(
            ours.get("restore_cold_to_first_token_s"), "the seed's snapshot restore on Modal (recorded), s",
            SEED_MODAL_RESTORE_S, higher_is_better=False),
        "full cold start -> first token, s": (
            vs_anchor(cold, "vLLM 0.26 start -> first token, s", v.get("start_to_first_token_s"), higher_is_better=False)
            if v.get("start_to_first_token_s") else no_anchor(cold)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--model-root", help="where the FP8 folder goes (default /dev/shm when it has room)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dormant-bench-scale"))
    p.add_argument("--runs", type=int, default=3, help="asleep and warm-restore requests each (median)")
    p.add_argument("--vllm", action="store_true", help="also vLLM 0.26's start and wake (vLLM in PYTHONPATH)")
    p.add_argument("--ours-from", help="an earlier result of this bench: its figures kept as ours, and only vLLM "
                                       "run (with --vllm; one call of the GPU machine is too short for both)")
    p.add_argument("--out")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = Path(args.config)
    config = json.loads(config_path.read_text())
    need = fp8_bytes(config)
    model_dir = model_root(args.model_root, work, need) / f"{config_path.stem}-fp8-block"
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        log(f"making {model_dir} ({need / 1e9:.1f} GB) from {config_path}")
        started = time.perf_counter()
        make_model(config_path, model_dir)
        log(f"  made in {time.perf_counter() - started:.0f} s")
    can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    out_path = result_path("scale", args.out)
    result = {"date": dt.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]), "machine": machine(),
              "model": f"{config_path.stem}, FP8 block (random weights)", "model_dir": str(model_dir),
              "checkpoint_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
              "seed_modal_restore_s": SEED_MODAL_RESTORE_S, "ours": {}, "vllm": None}

    def save() -> None:
        result["figures"] = figures(result["ours"], result["vllm"])
        write(out_path, result)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    vocab = config["vocab_size"]
    log_path = work / "dormant.log"
    if args.ours_from:
        earlier = json.loads(Path(args.ours_from).read_text())
        result["ours"] = earlier["ours"]
        result["ours_run"] = {k: earlier.get(k) for k in ("date", "command", "machine")}
    else:
        proc, base = start_dormant(model_dir, work, log_path)
        try:
            asyncio.run(run_dormant(base, vocab, result["ours"], save, args.runs, can_drop))
        finally:
            stop(proc)
            lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
            result["ours"]["server_log"] = [line[:300] for line in lines if any(k in line for k in bench_burst.LOG_KEYS)][-40:]
            save()
    if args.vllm:
        if can_drop:
            drop_caches()  # vLLM reads the folder as dormant's cold start did: from RAM (/dev/shm) either way
        vllm: dict = {}
        proc, base, vllm["server_start_s"] = start_vllm(model_dir, work / "vllm.log")
        log(f"vLLM ready after {vllm['server_start_s']:.1f} s")
        try:
            asyncio.run(run_vllm(base, vocab, vllm, args.runs))
        finally:
            stop(proc)
            result["vllm"] = vllm
            save()
    print_figures(result["figures"])
    log(f"wrote {out_path}; the server's log: {log_path}")


if __name__ == "__main__":
    main()
