"""Issue 15, item 10, on real sockets against a live gateway: clients that send a request head
or body too slowly (slowloris), or hold a connection and send nothing, are cut off within the
configured limits (gateway/timeouts.py), with a 408 where a response can still be sent; a
normal request is served meanwhile. No model is loaded: the gateway alone is under test."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
from e2e_harness import launch_gateway, model_config

KEY = "sk-e2e-timeouts"
HEADER_S, BODY_S, IDLE_S = 1.0, 2.0, 1.5
# a cut comes after its limit, give or take the event loop's tick and this machine's load
EARLY_S, LATE_S = 0.2, 2.0
DRIP_EVERY_S = 0.1

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    config = {**model_config(), "client_header_timeout": HEADER_S, "client_body_timeout": BODY_S,
              "client_idle_timeout": IDLE_S}
    gateway = launch_gateway(module_workdir, home, config, key=KEY)
    yield gateway
    gateway.stop()


class Conn:
    """A raw client connection, and how its server ended it."""

    def __init__(self, gw) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.opened = time.monotonic()
        self.received = b""
        self.closed_after: float | None = None

    def drip(self, data: bytes, gw, until_s: float) -> None:
        """Send `data` a byte at a time, DRIP_EVERY_S apart, until the server closes the
        connection (or `until_s` passes); a normal request is served at every 10th byte."""
        for i, byte in enumerate(data):
            if self.closed_after is not None or time.monotonic() - self.opened > until_s:
                return
            try:
                self.sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            self.read_for(DRIP_EVERY_S)
            if i % 10 == 0:
                started = time.monotonic()
                assert gw.http("GET", "/v1/models", timeout=5).status_code == 200
                assert time.monotonic() - started < 1.0  # the slow client holds nobody up
        self.read_for(until_s - (time.monotonic() - self.opened))

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + max(0.0, seconds)
        while self.closed_after is None and (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                return
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed_after = time.monotonic() - self.opened
            self.received += chunk

    def read_response(self, timeout: float = 5.0) -> None:
        """Read until one whole response (with a Content-Length) is in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.closed_after is None:
            head, sep, body = self.received.partition(b"\r\n\r\n")
            if sep:
                length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                              if line.startswith(b"content-length:"))
                if len(body) >= length:
                    return
            select.select([self.sock], [], [], deadline - time.monotonic())
            self.read_for(0.001)
        raise AssertionError(f"no whole response within {timeout} s: {self.received[:200]!r}")

    def status_and_error(self) -> tuple[int, dict]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        assert b"connection: close" in head.lower(), head
        return status, json.loads(body)["error"]

    def close(self) -> None:
        self.sock.close()


def _assert_cut_at(conn: Conn, limit: float, since: float = 0.0) -> None:
    assert conn.closed_after is not None, f"still open after {time.monotonic() - conn.opened:.1f} s"
    assert limit - EARLY_S <= conn.closed_after - since <= limit + LATE_S, (conn.closed_after, since, limit)


def test_a_slowloris_head_is_cut_off_while_others_are_served(gw):
    conn = Conn(gw)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nX-Padding: " + "a" * 200 + "\r\n\r\n").encode()
    conn.drip(head, gw, until_s=HEADER_S + LATE_S + 1)
    _assert_cut_at(conn, HEADER_S)
    status, err = conn.status_and_error()
    assert (status, err["code"], err["type"]) == (408, "request_timeout", "invalid_request_error"), err
    assert "client_header_timeout" in err["message"]
    conn.close()


def test_a_connection_that_sends_nothing_is_closed(gw):
    conn = Conn(gw)
    conn.read_for(HEADER_S + LATE_S + 1)
    _assert_cut_at(conn, HEADER_S)
    assert conn.received == b""  # no request began: nothing to answer
    conn.close()


def test_a_slow_body_gets_408(gw):
    body = json.dumps({"model": "smollm2", "prompt": "x" * 400, "max_tokens": 1}).encode()
    conn = Conn(gw)
    conn.sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                      + body[:10])
    conn.drip(body[10:], gw, until_s=BODY_S + LATE_S + 1)
    _assert_cut_at(conn, BODY_S)
    status, err = conn.status_and_error()
    assert (status, err["code"]) == (408, "request_timeout"), err
    assert "client_body_timeout" in err["message"]
    assert gw.replica()["state"] == "cold"  # the request never reached the model: none started
    conn.close()


def test_a_body_still_coming_after_a_refusal_is_cut_off(gw):
    """A 401 goes out without the body being read; trickling the rest on keeps nothing open."""
    conn = Conn(gw)
    conn.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                      b"Content-Length: 100000\r\n\r\n")
    conn.drip(b"x" * 1000, gw, until_s=BODY_S + LATE_S + 2)
    assert conn.received.startswith(b"HTTP/1.1 401"), conn.received[:100]
    _assert_cut_at(conn, BODY_S + 1.0)  # timeouts.BODY_BACKSTOP_SLACK_SECONDS after the limit
    conn.close()


def test_an_idle_keep_alive_connection_is_closed_and_a_slow_second_head_gets_408(gw):
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    conn = Conn(gw)
    conn.sock.sendall(request)
    conn.read_response()
    assert conn.received.startswith(b"HTTP/1.1 200") and conn.closed_after is None
    answered = time.monotonic() - conn.opened
    conn.read_for(IDLE_S + LATE_S + 1)
    _assert_cut_at(conn, IDLE_S, since=answered)
    conn.close()

    # the head deadline counts again from the first byte of each later request
    conn = Conn(gw)
    conn.sock.sendall(request)
    conn.read_response()
    conn.received = b""
    conn.sock.sendall(b"G")
    first_byte = time.monotonic() - conn.opened
    conn.drip(request[1:], gw, until_s=first_byte + HEADER_S + LATE_S + 1)
    _assert_cut_at(conn, HEADER_S, since=first_byte)
    assert conn.received.startswith(b"HTTP/1.1 408"), conn.received[:100]
    conn.close()
