"""Issue 15, item 10: a client that hangs up in the middle of its body costs the gateway one log
line, not two tracebacks, and nothing else."""

from __future__ import annotations

import socket

import pytest

from e2e_harness import launch_gateway, model_config, wait_for

PATHS = ["/v1/completions", "/v1/chat/completions"]
PARTS = [b"", b'{"model": "smollm2", "pro']  # nothing of the body, or some of it
LEFT = "client left before its body was in"


@pytest.mark.timeout(120)
def test_a_body_cut_short_by_its_client_logs_one_line_and_no_traceback(home, tmp_path):
    gw = launch_gateway(tmp_path, home, model_config())
    try:
        cut = [(path, part) for path in PATHS for part in PARTS]
        for path, part in cut:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100000\r\n\r\n".encode() + part)
        log = wait_for(lambda: (text := gw.log_path.read_text(errors="replace")).count(LEFT) >= len(cut) and text,
                       30, "the gateway to notice every client left")
        assert "Traceback" not in log and "ERROR" not in log, log
        assert gw.http("GET", "/v1/models").status_code == 200
    finally:
        gw.stop()
