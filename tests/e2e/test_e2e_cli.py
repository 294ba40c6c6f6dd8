"""`dormant serve`, `dormant ps` and `dormant stop` as a user runs them, against a real worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2e_harness import REPO, Gateway, launch_gateway, model_config

KEY = "cli-test-key"


@pytest.fixture(scope="module")
def served(home, module_workdir):
    # --sleep-after on the command line overrides the file's 10m for every model.
    gw = launch_gateway(module_workdir, home, model_config(sleep_after="10m"), key=KEY,
                        extra_args=("--sleep-after", "-1"), entry=("dormant.cli", "serve"))
    yield gw
    gw.stop()


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DORMANT_API_KEY": KEY, "DORMANT_URL": gw.base_url}
    return subprocess.run([sys.executable, "-m", "dormant.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)


@pytest.mark.timeout(240)
def test_ps_shows_the_replica_and_stop_unloads_it(served):
    before = cli(served, "ps")
    assert before.returncode == 0, before.stderr
    assert before.stdout.splitlines()[0].split() == ["MODEL", "STATE", "DEVICE", "PID", "GPU", "HOST", "DISK", "LAST",
                                                     "USED", "IDLE", "UNTIL"]
    assert "smollm2" in before.stdout and "cold" in before.stdout

    reply = served.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of Germany?"}],
        temperature=0, max_tokens=20)
    assert "Berlin" in reply.choices[0].message.content
    ready = cli(served, "ps")
    row = next(line for line in ready.stdout.splitlines() if line.startswith("smollm2"))
    assert "ready" in row and str(served.replica()["pid"]) in row
    assert row.split()[-1] != "10m", "--sleep-after -1 overrides the file's 10m"

    stopped = cli(served, "stop", "smollm2")
    assert stopped.returncode == 0, stopped.stderr
    assert served.replica()["state"] in ("stopped", "cold")
    assert served.replica()["pid"] is None


@pytest.mark.timeout(60)
def test_ps_without_the_key_fails_clearly(served):
    env = {**os.environ, "DORMANT_API_KEY": "wrong", "DORMANT_URL": served.base_url}
    result = subprocess.run([sys.executable, "-m", "dormant.cli", "ps"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=REPO)
    assert result.returncode == 1 and "401" in result.stderr
