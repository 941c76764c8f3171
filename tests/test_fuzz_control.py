"""Fuzz the control socket with raw and half-formed HTTP: it never hangs, never prints a
traceback, and still serves ``GET /status`` afterwards."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.daemon import control
from agent.daemon.control import ControlClient
from tests.controlkit import control_server, exchange, parse

#: A handler waits this long for bytes that never come (the daemon's is 10 s).
HANDLER_TIMEOUT = 0.3
#: Every connection is answered or closed well within this.
BOUND = 3.0

latin1 = st.text(st.characters(max_codepoint=255), max_size=40)
methods = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "BREW", ""]), latin1)
paths = st.one_of(st.sampled_from(["/status", "/metrics", "/trigger", "/pause", "/resume", "/", "*"]), latin1)
versions = st.one_of(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2", "", "HTTP/1.1 x"]), latin1)
lengths = st.one_of(
    st.none(),
    st.integers(-5, 200).map(str),
    st.integers(0, 10**7).map(str),
    st.sampled_from(["abc", "", " 12", "1e3", "0x10", "²", "-0", "10, 10"]),
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"{}", b"[1]", b'"x"', b"null", b'{"reason": 5}', b'{"reason": "fuzz"}', b"{"]),
)
headers = st.lists(st.tuples(latin1, latin1), max_size=4)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    line = f"{draw(methods)} {draw(paths)} {draw(versions)}\r\n"
    lines = [f"{k}: {v}\r\n" for k, v in draw(headers)]
    length = draw(lengths)
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    head = (line + "".join(lines) + "\r\n").encode("latin-1")
    return head + draw(bodies)


requests = st.one_of(st.binary(max_size=600), http_requests())


@pytest.mark.slow  # fuzzing: runs in CI (scripts/test), not in the fast suite
def test_fuzzed_requests_never_hang_or_print_tracebacks(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(control._Handler, "timeout", HANDLER_TIMEOUT)
    with control_server() as (path, _target):

        @settings(
            max_examples=150,
            derandomize=True,
            deadline=timedelta(seconds=BOUND + 2),
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(data=requests, half_close=st.booleans())
        def one(data: bytes, half_close: bool) -> None:
            started = time.monotonic()
            response = exchange(path, data, BOUND, half_close, until_complete=True)
            assert time.monotonic() - started < BOUND
            if not response:
                return  # closed without a word: e.g. nothing that reads as a request line
            assert response.startswith(b"HTTP/1.1 "), response[:200]
            code, headers, body = parse(response)
            if code >= 400:  # JSON like every answer, never the stdlib's HTML page
                assert headers["content-type"] == "application/json", response[:300]
                assert not body or isinstance(json.loads(body)["error"], str), response[:300]

        one()
        assert ControlClient(path).get("/status").json()["host"] == "stub"
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert "Exception occurred during processing" not in err, err[-3000:]
