"""`dormant serve`, `dormant ps` and `dormant stop` as a user runs them, against a real worker."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import yaml

from e2e_harness import REPO, Gateway, free_port, model_config, wait_for

KEY = "cli-test-key"


@pytest.fixture(scope="module")
def served(home, module_workdir):
    cfg = module_workdir / "dormant.yaml"
    cfg.write_text(yaml.safe_dump(model_config(sleep_after="10m")))
    port = free_port()
    env = {**os.environ, "DORMANT_HOME": str(home), "DORMANT_API_KEY": KEY}
    log_path = module_workdir / "serve.log"
    with open(log_path, "wb") as log:
        # --sleep-after on the command line overrides the file's 10m for every model.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg), "--port", str(port),
             "--sleep-after", "-1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    gw = Gateway(proc, port, KEY, log_path)

    def healthy() -> bool:
        assert proc.poll() is None, gw.log()
        try:
            return httpx.get(gw.base_url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 30, "dormant serve /health", interval=0.05)
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
    assert before.stdout.splitlines()[0].split() == ["MODEL", "ENGINE", "STATE", "PID", "MEMORY", "IDLE", "UNTIL"]
    assert "smollm2" in before.stdout and "cold" in before.stdout

    reply = served.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
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
