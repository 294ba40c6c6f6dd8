"""The gateway app in-process (no worker is started: every request here fails before one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dormant.config import ModelSpec, ServerConfig
from dormant.gateway.server import create_app

KEY = "sk-unit-test-key"
REPO = Path(__file__).resolve().parents[3]
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client():
    cfg = ServerConfig(api_keys=(KEY, "second-key"),
                       models=(ModelSpec(id="smollm2", source="builtin:smollm2", aliases=("tiny",)),))
    with TestClient(create_app(cfg), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.mark.timeout(30)
def test_import_leaves_torch_out():
    # How fast the gateway starts is measured by bench/bench_gateway_start.py, not asserted here.
    code = ("import sys; import dormant.gateway.server; "
            "print('torch' in sys.modules, 'transformers' in sys.modules, "
            "any(m.split('.')[:2] == ['dormant', 'worker'] or m.startswith('dormant.engines.native') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


@pytest.mark.timeout(30)
def test_auth_guards_everything_but_health(client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200


@pytest.mark.timeout(30)
def test_models_list(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["smollm2"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["owned_by"] == "dormant"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body,param", [
    ({**CHAT, "temperature": 9}, "temperature"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "frobnicate": True}, "frobnicate"),
    ({**CHAT, "keep_alive": "later"}, "keep_alive"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_bad_input_is_400_naming_the_param(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.timeout(30)
def test_malformed_json_is_400(client):
    for raw in (b"{not json", b"", b"[1, 2]"):
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.timeout(30)
def test_unknown_model_and_unknown_route_are_404(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.post("/unload", json={"model": "gpt-4o"}).status_code == 404
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.timeout(30)
def test_running_lists_cold_replicas(client):
    (entry,) = client.get("/running").json()["running"]
    assert entry == {"model": "smollm2", "engine": "native", "state": "cold", "tier": "cold", "device": "cpu",
                     "pid": None, "port": None, "gpu_bytes": 0, "host_bytes": 0, "disk_bytes": 0, "last_used": None,
                     "pinned": False, "memory_bytes": None, "idle_until": None, "in_flight": 0, "queued": 0,
                     "max_concurrent_requests": 8, "worker_stats": None,  # no worker has said its capacity yet
                     "suspension": None, "suspend_skipped": None}
    assert client.post("/unload").json() == {"unloaded": ["smollm2"]}  # nothing to stop


@pytest.mark.timeout(30)
def test_metrics_are_prometheus_text(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE dormant:num_requests_running gauge" in r.text
    assert 'dormant:num_requests_waiting{model="smollm2"} 0.0' in r.text


@pytest.mark.timeout(30)
def test_running_gateway_maps_no_torch(tmp_path):
    """The gateway process, once it says it is serving, has not loaded torch's libraries: that is
    what keeps its start short (timed in bench/bench_gateway_start.py)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dormant.gateway", "--port", str(port)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DORMANT_HOME": str(tmp_path), "DORMANT_API_KEY": ""})
    try:
        for line in proc.stderr:
            if line.startswith("dormant serving on"):
                assert line.strip() == f"dormant serving on http://127.0.0.1:{port} (models: smollm2)"
                with open(f"/proc/{proc.pid}/maps") as f:
                    maps = f.read()
                break
        else:
            raise AssertionError("the gateway never printed its readiness line")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert maps and "libtorch" not in maps


@pytest.mark.timeout(30)
def test_non_loopback_bind_without_a_key_is_refused(tmp_path):
    import os

    out = subprocess.run([sys.executable, "-m", "dormant.gateway", "--host", "0.0.0.0", "--port", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=20,
                         env={**os.environ, "DORMANT_HOME": str(tmp_path), "DORMANT_API_KEY": ""})
    assert out.returncode == 2
    assert "host" in out.stderr and "API key" in out.stderr


@pytest.mark.timeout(30)
def test_a_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "dormant.yaml"
    cfg.write_text("models:\n  smollm2:\n    stop_after: later\n")
    out = subprocess.run([sys.executable, "-m", "dormant.gateway", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "models.smollm2.stop_after" in out.stderr
