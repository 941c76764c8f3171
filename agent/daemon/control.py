"""The daemon's local control API: HTTP over an owner-only Unix socket.

Served by ``agent run`` (``Daemon``), used by ``agent status / trigger / pause / resume``.
Routes: ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text), ``POST /trigger``,
``POST /pause`` (``{"reason": ...}``), ``POST /resume``. The socket is mode 0600 in the state
dir: only its owner (root) can drive the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.core.errors import AgentError
from agent.daemon.logs import error_line

if TYPE_CHECKING:
    import httpx

MAX_BODY = 64 * 1024
#: Connections waiting to be accepted: ``agent status`` from many shells (or a monitoring
#: burst) must not be refused as "not running" (socketserver's default is 5).
BACKLOG = 128

log = structlog.get_logger("agent.control")


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...
    def trigger(self) -> dict[str, Any]: ...
    def pause(self, reason: str) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...


class BadRequest(Exception):
    """A request we answer with an error (400 unless told) and then close the connection."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = BACKLOG
    target: Controlled

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr (which is the journal)."""
        exc = sys.exc_info()[1]
        level = log.debug if isinstance(exc, ConnectionError | TimeoutError) else log.warning
        with contextlib.suppress(Exception):  # the last resort must not raise (a closed log stream)
            level("control connection failed", error=error_line(exc) if exc else "unknown")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    #: Seconds a connection may sit idle or send its body slowly (a stuck client holds a thread).
    timeout = 10.0

    def log_message(self, format: str, *args: Any) -> None:  # the daemon logs what matters
        pass

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 is not spoken here")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors as JSON like every other answer (the stdlib sends an HTML page)."""
        self.close_connection = True
        self.request_version = self.protocol_version  # a status line even for a garbled request
        short = self.responses.get(code, ("error",))[0]
        body = json.dumps({"error": message or short}).encode()
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, data: Any) -> None:
        self._send(code, json.dumps(data).encode())

    def _answer(self, route: Callable[[Controlled], tuple[int, Any]]) -> None:
        """Run ``route`` against the target: a bad request is a 400, a failure a 500 (one line)."""
        try:
            code, data = route(self.server.target)
        except BadRequest as exc:
            self.send_error(exc.code, str(exc))
            return
        except Exception as exc:
            error = error_line(exc)
            log.warning("control request failed", path=self.path, error=error)
            self.send_error(500, error)
            return
        if isinstance(data, str):
            self._send(code, data.encode(), "text/plain; version=0.0.4")
        else:
            self._json(code, data)

    def do_GET(self) -> None:
        self._answer(self._get)

    def _get(self, target: Controlled) -> tuple[int, Any]:
        if self.path == "/status":
            return 200, target.status()
        if self.path == "/metrics":
            return 200, target.metrics()
        return 404, {"error": f"no route {self.path}"}

    def do_POST(self) -> None:
        self._answer(self._post)

    def _post(self, target: Controlled) -> tuple[int, Any]:
        body = self._json_body()
        if self.path == "/trigger":
            return 200, target.trigger()
        if self.path == "/pause":
            reason = body.get("reason")
            if not isinstance(reason, str) or not reason.strip():
                raise BadRequest("a reason is required (a non-empty string)")
            return 200, target.pause(reason.strip()[:500])
        if self.path == "/resume":
            return 200, target.resume()
        return 404, {"error": f"no route {self.path}"}

    def _json_body(self) -> dict[str, Any]:
        """The request's body: a JSON object (none at all reads as ``{}``)."""
        if "Transfer-Encoding" in self.headers:
            raise BadRequest("Transfer-Encoding is not supported; send a Content-Length")
        raw_length = (self.headers.get("Content-Length") or "0").strip()
        if not (raw_length.isascii() and raw_length.isdigit()):  # no sign, no '1e3', no '²'
            raise BadRequest(f"Content-Length must be a non-negative integer, not {raw_length[:40]!r}")
        length = int(raw_length)
        if length > MAX_BODY:
            raise BadRequest(f"body too large ({length} bytes; at most {MAX_BODY})", 413)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raw = b""
        if len(raw) < length:
            raise BadRequest(f"body shorter than its Content-Length ({len(raw)} of {length} bytes)")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(f"body must be a JSON object, not {type(body).__name__}")
        return body


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
