"""Several models under one memory budget (issue 10), with real workers: three copies of SmolLM2
(hard links of one model folder) under a host budget that holds two running and one asleep.

`a` is pinned and preloaded; `b` and `c` take turns, each evicting the other to sleep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from e2e_harness import REPO, launch_gateway, wait_for

MiB = 2**20
# measured per running CPU copy: 770 MiB of weights (fp32 + a bf16 copy) + 16 MiB of KV + the
# placer's 300 MiB allowance for the process; asleep, the 300 MiB
RUNNING_MIB, ASLEEP_MIB = 1086, 300
HOST_BUDGET = f"{2 * RUNNING_MIB + ASLEEP_MIB + 60}MiB"  # two running and one asleep, not three running
HELLO = [{"role": "user", "content": "Say hello."}]
COUNTING = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def copies(model_dir: Path, workdir: Path) -> dict[str, str]:
    """Three model folders sharing one set of weight files."""
    out = {}
    for name in ("a", "b", "c"):
        folder = workdir / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if f.is_file() and not (folder / f.name).exists():
                os.link(f, folder / f.name)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="module")
def gw(home, model_dir, module_workdir):
    sources = copies(model_dir, module_workdir)
    common = {"kv_cache_memory": "16MiB", "device": "cpu", "sleep_after": -1, "hibernate_after": -1}
    config = {
        "budgets": {"host_memory": HOST_BUDGET},
        "models": {"a": {"source": sources["a"], "pin": True, "preload": True, **common},
                   "b": {"source": sources["b"], **common}, "c": {"source": sources["c"], **common}},
    }
    gateway = launch_gateway(module_workdir, home, config)
    yield gateway
    gateway.stop()


def ask(gw, model: str, max_tokens: int = 4) -> str:
    reply = gw.openai().chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


@pytest.mark.timeout(600)
def test_models_take_turns_under_the_host_budget(gw):
    gw.wait_state("ready", model="a", timeout=180)  # preloaded: no request needed

    assert ask(gw, "b") and ask(gw, "c")  # three running would not fit: b (idle, unpinned) sleeps
    assert gw.replica("b")["state"] == "asleep" and gw.replica("a")["state"] == "ready"
    assert ask(gw, "b")  # and back: c sleeps, b wakes
    assert gw.replica("c")["state"] == "asleep" and gw.replica("b")["state"] == "ready"
    assert ask(gw, "a")

    assert gw.metric("dormant:evictions_total", model="b", reason="make_room", action="sleep") >= 1
    assert gw.metric("dormant:evictions_total", model="c", reason="make_room", action="sleep") >= 1
    assert gw.metric("dormant:state_transitions_total", model="a", from_state="ready", to_state="draining") == 0
    assert gw.metric("dormant:time_to_first_token_by_tier_seconds_count", model="b", tier="asleep") >= 1

    entry = gw.replica("c")
    assert entry["tier"] == "asleep" and entry["device"] == "cpu" and entry["gpu_bytes"] == 0
    assert entry["host_bytes"] == ASLEEP_MIB * MiB and entry["last_used"] is not None
    b = gw.replica("b")
    assert b["tier"] == "device" and b["host_bytes"] > RUNNING_MIB * MiB // 2
    ps = subprocess.run([sys.executable, "-m", "dormant.cli", "ps", "--url", gw.base_url], cwd=REPO,
                        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ps.returncode == 0 and "LAST USED" in ps.stdout and "asleep" in ps.stdout, ps.stdout + ps.stderr


@pytest.mark.timeout(600)
def test_a_busy_model_streams_to_its_end_while_another_waits_for_room(gw):
    ask(gw, "b")
    gw.wait_state("ready", model="b")
    events: list[str] = []

    def long_stream() -> None:
        with gw.http_stream("/v1/chat/completions", {"model": "b", "messages": COUNTING, "temperature": 0,
                                                     "max_tokens": 60, "stream": True}) as lines:
            for line in lines:
                events.append(line)

    stream = threading.Thread(target=long_stream)
    stream.start()
    wait_for(lambda: any("content" in e for e in events), 120, "the stream's first token")
    assert ask(gw, "c")  # waits for room: b is busy and a is pinned
    stream.join(timeout=300)
    assert events[-1] == "[DONE]"
    assert any('"finish_reason":"length"' in e.replace(" ", "") for e in events)
    assert gw.replica("a")["state"] == "ready"
    assert gw.replica("b")["state"] == "asleep"


@pytest.mark.timeout(60)
def test_a_bad_budget_fails_at_start_naming_the_key(module_workdir):
    cfg = module_workdir / "bad.yaml"
    cfg.write_text("budgets:\n  host_memory: plenty\n")
    r = subprocess.run([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "budgets.host_memory" in r.stderr
