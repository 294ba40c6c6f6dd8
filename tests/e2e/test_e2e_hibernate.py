"""Hibernation through the gateway: the worker exits after hibernate_after, its engine image
stays, and the next request restores from the image, in a worker forked by the zygote, with
identical greedy output; the forked worker still dies with a SIGKILLed gateway."""

from __future__ import annotations

import shutil
import signal
import stat

import psutil
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ask(gw, keep_alive=None) -> str:
    extra = {"keep_alive": keep_alive} if keep_alive is not None else None
    reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=16,
                                                extra_body=extra)
    return reply.choices[0].message.content


def worker_stats(gw) -> dict:
    return gw.replica()["worker_stats"]


@pytest.mark.timeout(400)
def test_hibernates_and_restores_from_the_image(home, tmp_path):
    shutil.rmtree(home / "images", ignore_errors=True)  # the first start must be a cold one
    # engine native: the engine image is its own (the llama.cpp default writes none; test_e2e_load
    # takes it through hibernation)
    gw = launch_gateway(tmp_path, home, model_config(hibernate_after="1s", engine="native"))
    try:
        first = ask(gw, keep_alive=-1)
        cold = worker_stats(gw)
        assert cold["cold_start"]["weights_source"] == "safetensors"
        pid = gw.replica()["pid"]

        ask(gw)  # back to hibernate_after=1s once it ends
        hibernated = gw.wait_state("hibernated", timeout=120)
        assert hibernated["pid"] is None
        wait_for(lambda: gone(pid), 30, f"worker {pid} to exit")
        [folder] = (home / "images").iterdir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
            "manifest.json": 0o600, "weights.bin": 0o600}

        assert ask(gw, keep_alive=-1) == first  # greedy output identical after the restore
        restored = worker_stats(gw)
        assert restored["pid"] != pid
        assert restored["cold_start"]["weights_source"] == "image"
        assert gw.metric("dormant:cold_start_seconds_count", model="smollm2", tier="hibernated") == 1
        assert gw.metric("dormant:cold_start_phase_seconds_count", model="smollm2", phase="weight_load",
                         path="image") == 1
        assert gw.metric("dormant:state_transitions_total", model="smollm2", from_state="hibernated",
                         to_state="starting") == 1

        new_pid = gw.replica()["pid"]
        # By now the zygote is up (it starts with the gateway): the restore was forked from it.
        assert f"worker pid {new_pid} forked by the zygote" in gw.log_path.read_text()
        gw.stop(signal.SIGKILL)  # no orphan: the forked worker dies with the gateway (via the zygote)
        wait_for(lambda: gone(new_pid), 30, f"worker {new_pid} to exit after the gateway's SIGKILL")
    finally:
        gw.stop()
