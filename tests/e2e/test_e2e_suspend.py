"""The suspended tier where the driver's checkpoint API cannot run (no GPU here: no cuda-bindings,
or no CUDA process in the worker): with the real gateway and worker, the tier is skipped with one
log line that says why, /running says it too, and the replica goes on to its next tier. The
suspension itself is tested on the GPU (tests/gpu/test_suspend_gpu.py)."""

from __future__ import annotations

import pytest

from e2e_harness import launch_gateway, model_config, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
SKIPPED = "suspended tier skipped"


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config(sleep_after="1s", suspend_after="2s",
                                                                hibernate_after="5s"))
    yield gateway
    gateway.stop()


def skipped_lines(gw) -> int:
    return gw.log_path.read_text(errors="replace").count(SKIPPED)  # the whole log: gw.log() is its tail


def ask(gw) -> str:
    reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=12)
    return reply.choices[0].message.content


@pytest.mark.timeout(300)
def test_without_the_api_the_suspend_tier_is_skipped_once_and_the_next_tier_comes(gw):
    first = ask(gw)
    ready = gw.wait_state("ready")
    skipped = wait_for(lambda: gw.replica()["suspend_skipped"], 60, "the suspend tier tried and skipped")
    r = gw.replica()
    assert r["state"] == "asleep" and r["pid"] == ready["pid"] and r["suspension"] is None
    assert "cuda-bindings" in skipped or "CUDA" in skipped, skipped  # the reason, as the log says it
    gw.wait_state("hibernated", timeout=60)
    assert skipped_lines(gw) == 1
    # another idle period: asleep, then hibernated at its time, without trying again
    assert ask(gw) == first
    gw.wait_state("asleep", timeout=60)
    gw.wait_state("hibernated", timeout=60)
    assert skipped_lines(gw) == 1
    assert gw.metric("dormant:state_transitions_total", model="smollm2", from_state="suspending",
                     to_state="asleep") == 1
