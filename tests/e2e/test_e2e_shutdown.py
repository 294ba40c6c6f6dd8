"""Issue 15, item 9, with a real gateway, zygote and worker: SIGTERM refuses new requests with a
503, lets short requests finish, ends a stream still open after the grace with an error event
and `data: [DONE]`, and leaves no process and no runtime file; a SIGKILL's leftovers under
<store>/run are removed by the next start, and none are made in /tmp."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

GRACE = 6.0
# past the grace: the cut, then the workers' stop (SIGTERM; the zygote is killed)
EXIT_MARGIN = 15.0
LONG = {"model": "smollm2", "prompt": "Count from 1 to 1000:", "max_tokens": 1500, "ignore_eos": True,
        "temperature": 0, "stream": True}
SHORT = {**LONG, "max_tokens": 4}


class _Stream(threading.Thread):
    """A streamed completion read on its own thread: its `data:` payloads, and whether it began."""

    def __init__(self, gw, body: dict) -> None:
        super().__init__(daemon=True)
        self.gw, self.body = gw, body
        self.payloads: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.gw.base_url + "/v1/completions", json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        self.payloads.append(line[len("data:"):].strip())
        except BaseException as exc:  # reported by the test, not lost on this thread
            self.error = exc

    def has_tokens(self) -> bool:
        return any(p.startswith("{") and json.loads(p).get("choices") for p in self.payloads)


def _zygote_socket(processes: list[psutil.Process]) -> Path:
    """Where the gateway's zygote listens (its --socket argument)."""
    for p in processes:
        argv = p.cmdline()
        if "dormant.worker.zygote" in argv:
            return Path(argv[argv.index("--socket") + 1])
    raise AssertionError(f"no zygote among {[p.cmdline() for p in processes]}")


def _run_entries(home: Path, pid: int) -> list[Path]:
    return [p for p in (home / "run").glob(f"*-{pid}-*")]


@pytest.mark.timeout(240)
def test_sigterm_refuses_new_requests_finishes_short_ones_and_ends_open_streams(home, tmp_path):
    gw = launch_gateway(tmp_path, home, {**model_config(), "shutdown_grace": f"{GRACE}s"})
    try:
        long_stream, short_stream = _Stream(gw, LONG), _Stream(gw, SHORT)
        long_stream.start()
        wait_for(long_stream.has_tokens, 120, "the long stream's first tokens")
        processes = psutil.Process(gw.proc.pid).children(recursive=True)
        assert len(processes) >= 2, "a worker and the zygote run under the gateway"
        socket = _zygote_socket(processes)
        assert socket.parent in _run_entries(home, gw.proc.pid)  # under <store>/run, not /tmp
        assert socket.parent.stat().st_mode & 0o777 == 0o700
        short_stream.start()
        wait_for(short_stream.has_tokens, 30, "the short stream's first tokens")

        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # uvicorn sees the signal at its next tick (0.1 s): a request before that is still served
        deadline = time.monotonic() + 10
        while True:
            refused = gw.http("POST", "/v1/completions", json={**SHORT, "stream": False}, timeout=10)
            if refused.status_code != 200 or time.monotonic() > deadline:
                break
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "server_shutting_down"

        short_stream.join(30)
        assert short_stream.error is None, short_stream.error
        assert short_stream.payloads[-1] == "[DONE]"
        assert not any('"error"' in p for p in short_stream.payloads)  # finished within the grace

        long_stream.join(GRACE + 30)
        assert long_stream.error is None, long_stream.error
        assert long_stream.payloads[-1] == "[DONE]"
        ending = json.loads(long_stream.payloads[-2])
        assert ending["error"]["code"] == "server_shutting_down", ending
        assert time.monotonic() - signalled >= GRACE - 0.5  # it had its grace

        # uvicorn, its work done, re-raises the signal it caught: -15 is a clean exit here
        assert gw.proc.wait(timeout=GRACE + EXIT_MARGIN) in (0, -signal.SIGTERM), gw.log()
        assert time.monotonic() - signalled < GRACE + EXIT_MARGIN
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes),
                 10, "no process of the gateway's left")
        assert not _run_entries(home, gw.proc.pid)
        assert not socket.parent.exists()
        assert "Traceback" not in gw.log_path.read_text(errors="replace")
    finally:
        gw.stop(signal.SIGKILL)


@pytest.mark.timeout(240)
def test_a_killed_gateway_s_runtime_files_are_removed_by_the_next_start(home, tmp_path):
    gw = launch_gateway(tmp_path / "first", home, model_config())
    try:
        assert gw.http("POST", "/v1/completions", json={**SHORT, "stream": False}).status_code == 200
        left = _run_entries(home, gw.proc.pid)
        assert left
        processes = psutil.Process(gw.proc.pid).children(recursive=True)
        assert _zygote_socket(processes).parent in left
    finally:
        gw.stop(signal.SIGKILL)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes),
             30, "the zygote and its worker gone with the gateway")
    assert all(p.exists() for p in left)  # a SIGKILL leaves them ...
    nxt = launch_gateway(tmp_path / "second", home, model_config())
    try:
        assert not any(p.exists() for p in left)  # ... and the next start removes them
    finally:
        nxt.stop()
