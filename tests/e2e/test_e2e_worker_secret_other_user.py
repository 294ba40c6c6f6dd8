"""Issue 15, item 3, as the audit ran it: another local user (`nobody`) goes at a live worker
directly. Its control and completion routes refuse it (401), and it finds the worker's secret
nowhere it can read: not in the environment of the gateway, the zygote or the worker
(/proc/<pid>/environ), not on their command lines, not in any file under the store, and it
cannot reach the zygote's socket (which forks workers with the environment it is sent).

Needs root (to become `nobody`); the client is a fork of this test process that drops to
nobody's uid and gid, so it needs nothing from the interpreter's files (under /root, 0700)."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import os
import pwd
import re
import socket
import stat
from pathlib import Path

import pytest
from e2e_harness import launch_gateway, model_config, wait_for

KEY = "sk-e2e-other-user"
# the operator's own secret (process.py takes DORMANT_WORKER_TOKEN from the gateway's
# environment): the test knows what to look for; it travels the zygote's way like a fresh one.
# Made at run time: a constant would sit in this file, which a clone under /tmp leaves readable
SECRET = f"dormant-e2e-secret-{secrets.token_hex(12)}"
PROMPT = json.dumps({"model": "smollm2", "prompt": "Hello", "max_tokens": 2}).encode()

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test becomes user `nobody` to attack the worker"),
]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DORMANT_WORKER_TOKEN", SECRET)
        gateway = launch_gateway(module_workdir, home, {**model_config(), "zygote": True}, key=KEY)
    wait_for(lambda: "zygote pid" in gateway.log_path.read_text(), 180, "the zygote", interval=0.2)
    yield gateway
    gateway.stop()


def _as_nobody(attack) -> dict:
    """attack() run in a child process with nobody's uid and gid; its JSON-able result."""
    user = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here, only os._exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result = {"ok": attack()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails on it
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(raw)
    assert "error" not in result, result["error"]
    return result["ok"]


def _status(port: int, method: str, path: str, body: bytes | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def _readable(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _files_holding(root: Path, needle: bytes) -> list[str]:
    """Files under `root` that the caller can read and that hold `needle` (big ones in chunks)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue
                with open(path, "rb") as f:
                    tail = b""
                    while chunk := f.read(1 << 22):
                        if needle in tail + chunk:
                            found.append(str(path))
                            break
                        tail = chunk[-len(needle):]
            except OSError:
                continue
        # unreadable folders are skipped by os.walk: nobody cannot look inside them either
    return found


@pytest.mark.timeout(300)
def test_another_local_user_can_neither_use_the_worker_nor_find_its_secret(gw, tmp_path_factory):
    r = gw.http("POST", "/v1/completions", content=PROMPT, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    replica = gw.wait_state("ready", timeout=30)
    port, worker_pid = replica["port"], replica["pid"]
    assert f"worker pid {worker_pid} forked by the zygote" in gw.log_path.read_text()
    zygote_pid = int(re.findall(r"zygote pid (\d+) ready", gw.log_path.read_text())[-1])
    pids = {"gateway": gw.proc.pid, "zygote": zygote_pid, "worker": worker_pid}
    store = Path(home_of(gw))
    sockets = [str(p) for p in store.rglob("*.sock")]
    assert sockets, "the zygote's socket is under the store"
    secret = SECRET.encode()
    # the check can fail: as root the secret is there to be read
    assert secret in Path(f"/proc/{gw.proc.pid}/environ").read_bytes()

    def attack() -> dict:
        return {
            "sleep": _status(port, "POST", "/sleep?level=2"),
            "completion": _status(port, "POST", "/v1/completions", PROMPT),
            "environ": {who: _readable(Path(f"/proc/{pid}/environ")) is not None for who, pid in pids.items()},
            "cmdline": {who: secret in (_readable(Path(f"/proc/{pid}/cmdline")) or b"") for who, pid in pids.items()},
            "files": _files_holding(store, secret) + _files_holding(Path("/tmp"), secret),
            "store_entries_seen": len(os.listdir(store)),
            "zygote_socket": [path for path in sockets if _can_connect(path)],
        }

    # the worst case: a store nobody can walk into (made by hand, or under a 0755 home); what
    # the store keeps to itself must then be closed by its own modes
    with _opened_to_others(store, tmp_path_factory.getbasetemp().parent):
        seen = _as_nobody(attack)
    assert (seen["sleep"], seen["completion"]) == (401, 401), seen
    assert not any(seen["environ"].values()), seen["environ"]
    assert not any(seen["cmdline"].values()), seen["cmdline"]
    assert seen["files"] == [], seen["files"]
    assert seen["store_entries_seen"] > 0  # nobody did look inside the store
    assert seen["zygote_socket"] == [], seen["zygote_socket"]

    after = gw.replica()
    assert (after["state"], after["pid"]) == ("ready", worker_pid), after
    assert gw.http("POST", "/v1/completions", content=PROMPT,
                   headers={"Content-Type": "application/json"}).status_code == 200


def home_of(gw) -> str:
    """The store the gateway was started with (launch_gateway sets DORMANT_HOME)."""
    environ = Path(f"/proc/{gw.proc.pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"DORMANT_HOME="))


@contextlib.contextmanager
def _opened_to_others(store: Path, within: Path):
    """The store and its folders up to `within` (the test's own temp folders), readable and
    searchable by others for the duration."""
    folders = [p for p in (store, *store.parents) if p.is_relative_to(within)]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in folders}
    try:
        for p, mode in modes.items():
            p.chmod(mode | 0o055)
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def _can_connect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
