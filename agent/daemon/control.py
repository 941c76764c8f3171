"""The daemon's local control API: HTTP over an owner-only Unix socket.

Served by ``agent run`` (``Daemon``), used by ``agent status / trigger / pause / resume``.
Routes: ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text), ``POST /trigger``,
``POST /pause`` (``{"reason": ...}``), ``POST /resume``. The socket is mode 0600 in the state
dir: only its owner (root) can drive the agent.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.core.errors import AgentError

if TYPE_CHECKING:
    import httpx

MAX_BODY = 64 * 1024


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...
    def trigger(self) -> dict[str, Any]: ...
    def pause(self, reason: str) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    target: Controlled


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the daemon logs what matters
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, data: Any) -> None:
        self._send(code, json.dumps(data).encode())

    def do_GET(self) -> None:
        if self.path == "/status":
            self._json(200, self.server.target.status())
        elif self.path == "/metrics":
            self._send(200, self.server.target.metrics().encode(), "text/plain; version=0.0.4")
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": "body too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        target = self.server.target
        if self.path == "/trigger":
            self._json(200, target.trigger())
        elif self.path == "/pause":
            reason = str(body.get("reason") or "").strip()
            if not reason:
                self._json(400, {"error": "a reason is required"})
                return
            self._json(200, target.pause(reason[:500]))
        elif self.path == "/resume":
            self._json(200, target.resume())
        else:
            self._json(404, {"error": f"no route {self.path}"})


class ControlServer:
    def __init__(self, path: Path, target: Controlled) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)  # a stale socket of a dead daemon (the instance lock is held)
        old = os.umask(0o077)
        try:
            self.server = _Server(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server.target = target
        self.thread = threading.Thread(target=self.server.serve_forever, name="control-api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


class NotRunning(AgentError):
    """No daemon answers on the control socket."""


class ControlClient:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _request(self, method: str, route: str, body: dict[str, Any] | None = None) -> httpx.Response:
        import httpx  # the client side only: the daemon never pays for importing it

        if not self.path.exists():
            raise NotRunning(f"agent not running (no control socket at {self.path})")
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.path)), timeout=self.timeout) as client:
                return client.request(method, f"http://agent{route}", json=body)
        except httpx.TransportError as exc:
            raise NotRunning(f"agent not running (control socket {self.path}: {type(exc).__name__})") from None

    def get(self, route: str) -> httpx.Response:
        return self._request("GET", route)

    def post(self, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self._request("POST", route, body or {})
        data: dict[str, Any] = r.json()
        if r.status_code >= 400:
            raise AgentError(str(data.get("error", r.text)))
        return data
