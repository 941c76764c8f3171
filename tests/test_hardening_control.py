"""The control socket answers bad requests with a 400 JSON error, never a stderr traceback."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from agent.daemon import control
from agent.daemon.control import ControlClient
from tests.controlkit import StubTarget, control_server, exchange, json_error, parse


def _post(route: str, body: bytes, length: str | None = None) -> bytes:
    length = str(len(body)) if length is None else length
    return (
        f"POST {route} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode() + body


def _no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    assert "----------" not in err, err  # socketserver's handle_error banner


@pytest.mark.parametrize(
    ("request_bytes", "fragment"),
    [
        (_post("/pause", b'{"reason": "x"}', length="abc"), "Content-Length"),
        (_post("/pause", b'{"reason": "x"}', length="-5"), "Content-Length"),
        (_post("/pause", b'{"reason": "x"}', length="1e3"), "Content-Length"),
        (_post("/pause", b"[1]"), "JSON object"),
        (_post("/pause", b'"x"'), "JSON object"),
        (_post("/pause", b"null"), "JSON object"),
        (_post("/trigger", b"7"), "JSON object"),
        (_post("/pause", b"\xff\xfe"), "not JSON"),
        (_post("/pause", b'{"reason": 5}'), "reason"),
        (_post("/pause", b'{"reason": ["stop"]}'), "reason"),
        (_post("/pause", b'{"reason": "   "}'), "reason"),
        (_post("/pause", b'{"reason": "x"}', length="100"), "shorter"),  # then we close our side
    ],
    ids=[
        "length-abc",
        "length-negative",
        "length-float",
        "list",
        "string",
        "null",
        "number",
        "not-utf8",
        "reason-int",
        "reason-list",
        "reason-blank",
        "short-body",
    ],
)
def test_bad_post_bodies_are_400_json(request_bytes: bytes, fragment: str, capfd: pytest.CaptureFixture[str]) -> None:
    with control_server() as (path, target):
        code, error = json_error(exchange(path, request_bytes))
        assert target.paused == [] and target.triggers == 0
    assert code == 400
    assert fragment in error
    _no_traceback(capfd)


@pytest.mark.slow  # waits on a real socket timeout
def test_a_body_that_never_comes_times_out_with_400(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(control._Handler, "timeout", 0.3)
    with control_server() as (path, _target):
        started = time.monotonic()
        code, error = json_error(exchange(path, _post("/pause", b"{", length="50"), half_close=False))
        assert time.monotonic() - started < 3
    assert code == 400 and "shorter" in error
    _no_traceback(capfd)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00\xff garbage\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /status\r\n\r\n",  # HTTP/0.9: not spoken here
        b"GET /status HTTP/9.9\r\n\r\n",
        b"GET /status HTTP/1.1 extra words\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nno colon header\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ],
    ids=[
        "binary",
        "one-word",
        "http-0.9",
        "http-9.9",
        "extra-words",
        "unknown-method",
        "too-many-headers",
        "long-uri",
        "long-header",
    ],
)
def test_garbage_requests_are_json_errors(request_bytes: bytes, capfd: pytest.CaptureFixture[str]) -> None:
    with control_server() as (path, _target):
        code, _error = json_error(exchange(path, request_bytes))
    assert 400 <= code < 600
    _no_traceback(capfd)


def test_a_pause_reason_is_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with control_server() as (path, target):
        code, _headers, body = parse(exchange(path, _post("/pause", b'{"reason": "maintenance"}')))
        assert code == 200 and json.loads(body)["reason"] == "maintenance"
        assert target.paused == ["maintenance"]
        # An empty body still reaches /trigger (the CLI sends {} but curl -X POST sends nothing).
        code, _headers, _body = parse(exchange(path, b"POST /trigger HTTP/1.1\r\nHost: agent\r\n\r\n"))
        assert code == 200 and target.triggers == 1
    _no_traceback(capfd)


class _Broken(StubTarget):
    def status(self) -> dict[str, Any]:
        raise RuntimeError("state file vanished")


def test_a_failing_target_is_a_500_json_error(capfd: pytest.CaptureFixture[str]) -> None:
    with control_server(_Broken()) as (path, _target):
        code, error = json_error(exchange(path, b"GET /status HTTP/1.1\r\nHost: agent\r\n\r\n"))
        assert code == 500 and error == "RuntimeError: state file vanished"
        # ... and the server still serves.
        assert ControlClient(path).get("/metrics").text == "agent_up 1\n"
    _no_traceback(capfd)


@pytest.mark.slow  # waits on a real socket timeout
def test_a_client_that_goes_away_leaves_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    class Slow(StubTarget):
        def metrics(self) -> str:
            time.sleep(0.2)
            return "x" * 2_000_000  # larger than the socket buffer: the write meets a closed peer

    with control_server(Slow()) as (path, _target):
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
        time.sleep(0.5)
        assert ControlClient(path).get("/status").json()["host"] == "stub"
    _no_traceback(capfd)


def test_100_concurrent_status_queries_all_answered() -> None:
    # Raw sockets with a timeout connect exactly as httpx does (non-blocking: a full accept
    # queue is EAGAIN, which ControlClient reports as "not running"); building 100 httpx
    # clients would cost seconds of TLS-context setup and test nothing more.
    class Busy(StubTarget):
        def status(self) -> dict[str, Any]:
            time.sleep(0.05)  # a real status reads the state file: the accept queue fills up
            return super().status()

    with control_server(Busy()) as (path, _target):
        barrier = threading.Barrier(100)

        def query(_: int) -> str:
            barrier.wait()
            code, _headers, body = parse(exchange(path, b"GET /status HTTP/1.1\r\nHost: agent\r\n\r\n", timeout=30))
            assert code == 200
            return str(json.loads(body)["host"])

        with ThreadPoolExecutor(max_workers=100) as pool:
            hosts = list(pool.map(query, range(100)))
        assert hosts == ["stub"] * 100
        # ... and the CLI's own client still gets through afterwards.
        assert ControlClient(path).get("/status").json()["host"] == "stub"
