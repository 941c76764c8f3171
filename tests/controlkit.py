"""A real ControlServer on a short temporary socket path, with a stub target, and a raw client."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from agent.daemon.control import ControlServer


class StubTarget:
    """Implements ``control.Controlled``; records what it was asked."""

    def __init__(self) -> None:
        self.paused: list[str] = []
        self.triggers = 0

    def status(self) -> dict[str, Any]:
        return {"host": "stub", "running": True, "paused": self.paused[-1] if self.paused else None}

    def metrics(self) -> str:
        return "agent_up 1\n"

    def trigger(self) -> dict[str, Any]:
        self.triggers += 1
        return {"triggered": True}

    def pause(self, reason: str) -> dict[str, Any]:
        self.paused.append(reason)
        return {"paused": True, "reason": reason}

    def resume(self) -> dict[str, Any]:
        return {"resumed": True}


@contextmanager
def control_server(target: Any = None) -> Iterator[tuple[Path, Any]]:
    """Yields (socket path, target); AF_UNIX paths are short, so not under pytest's tmp_path."""
    target = target or StubTarget()
    structlog.reset_defaults()  # not a stream an earlier test configured (and pytest closed)
    tmp = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    server = ControlServer(tmp / "agent.sock", target)
    # The same server loop, polling for shutdown faster than the daemon's 0.5 s: tests close often.
    server.thread = threading.Thread(
        target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, name="control-api", daemon=True
    )
    server.start()
    try:
        yield server.path, target
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def exchange(
    path: Path, data: bytes, timeout: float = 5.0, half_close: bool = True, until_complete: bool = False
) -> bytes:
    """Send raw bytes, optionally close our side, and read until the server closes (or, with
    ``until_complete``, until one whole response is in). No answer within ``timeout`` raises."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything we send
        got = b""
        while not (until_complete and complete(got)):
            assert time.monotonic() < deadline, f"no answer within {timeout}s to {data[:80]!r}"
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return got


def complete(response: bytes) -> bool:
    """One whole HTTP response (headers and a body of its Content-Length) is in."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status code, headers (lower-case names) and body of the first response in ``response``."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    return code, headers, body[:length]


def json_error(response: bytes) -> tuple[int, str]:
    code, headers, body = parse(response)
    assert headers["content-type"] == "application/json", response
    data = json.loads(body)
    assert isinstance(data, dict) and isinstance(data.get("error"), str), response
    return code, data["error"]
