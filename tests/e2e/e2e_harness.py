"""Helpers for end-to-end tests: real gateways (`python -m dormant.gateway`) on free ports.

Every gateway points DORMANT_HOME at the session's `store_home` (tests/conftest.py), where the
real SmolLM2 is imported once. Nothing waits on fixed sleeps: helpers poll /health, /running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Gateway:
    def __init__(self, proc: subprocess.Popen, port: int, key: str | None, log_path: Path) -> None:
        self.proc, self.port, self.key, self.log_path = proc, port, key, log_path
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def openai(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.key or "unused", max_retries=0, **kw)

    def http(self, method: str, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("timeout", 120)
        return httpx.request(method, self.base_url + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    @contextlib.contextmanager
    def http_stream(self, path: str, body: dict, timeout: float = 120) -> Iterator[Iterator[str]]:
        """POST a streaming request; yields an iterator over its `data:` payloads (comments skipped)."""
        with httpx.stream("POST", self.base_url + path, json=body, headers=self.headers, timeout=timeout) as r:
            assert r.status_code == 200, r.read()
            yield (line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:"))

    def replica(self, model: str = "smollm2") -> dict[str, Any]:
        running = self.http("GET", "/running", timeout=10).json()["running"]
        return next(r for r in running if r["model"] == model)

    def wait_state(self, states: str | tuple[str, ...], model: str = "smollm2", timeout: float = 120) -> dict:
        states = (states,) if isinstance(states, str) else states
        return wait_for(lambda: (r := self.replica(model))["state"] in states and r, timeout, f"{model} in {states}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.http("GET", "/metrics").text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def launch_gateway(workdir: Path, store_home: Path, config: dict, key: str | None = None,
                   extra_args: tuple[str, ...] = (), entry: tuple[str, ...] = ("dormant.gateway",)) -> Gateway:
    """Start a gateway; `entry=("dormant.cli", "serve")` starts it the way a user does."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "dormant.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "DORMANT_HOME": str(store_home), "DORMANT_API_KEY": key or "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_path = workdir / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", *entry, "--config", str(cfg_path),
                                 "--port", str(port), *extra_args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    gw = Gateway(proc, port, key, log_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        try:
            return httpx.get(gw.base_url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 30, "gateway /health", interval=0.05)
    return gw


def model_config(**overrides: Any) -> dict:
    spec = {"source": "builtin:smollm2", "aliases": ["tiny"], "sleep_after": -1, "stop_after": -1, **overrides}
    return {"models": {"smollm2": spec}}


def tool_model_folder(model_dir: Path, dest: Path) -> Path:
    """SmolLM2 with a Hermes (Qwen-format) tool template of our own writing
    (tests/data/hermes_tools.jinja), as a model folder at `dest`: SmolLM2's own template has no
    tools (issue 11). The weights are linked, not copied."""
    dest.mkdir()
    for item in model_dir.iterdir():
        if item.name == "model.safetensors":
            (dest / item.name).symlink_to(item)
        else:
            shutil.copy(item, dest / item.name)
    template = (REPO / "tests" / "data" / "hermes_tools.jinja").read_text()
    (dest / "chat_template.jinja").write_text(template)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dest
