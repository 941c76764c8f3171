"""The daemon's local control API: HTTP over an owner-only Unix socket.

Served by ``agent run`` (``Daemon``), used by ``agent status / trigger / pause / resume``.
Routes: ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text), ``POST /trigger``,
``POST /pause`` (``{"reason": ...}``), ``POST /resume``. The socket is mode 0600 in the state
dir: only its owner (root) can drive the agent.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.adapters.httpserver import BACKLOG, MAX_BODY, BadRequest, JsonHandler, UnixServer
from agent.core.errors import AgentError

if TYPE_CHECKING:
    import httpx

__all__ = ["BACKLOG", "MAX_BODY", "BadRequest", "ControlClient", "ControlServer", "Controlled", "NotRunning"]


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...
    def trigger(self) -> dict[str, Any]: ...
    def pause(self, reason: str) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...


class _Server(UnixServer):
    log_name = "agent.control"
    target: Controlled


class _Handler(JsonHandler):
    """The routes; the hardening (JSON errors, bounded bodies, timeouts) is ``JsonHandler``'s."""

    server: _Server
    log_name = "agent.control"

    def do_GET(self) -> None:
        self.answer(self._get)

    def _get(self) -> tuple[int, Any]:
        target = self.server.target
        if self.path == "/status":
            return 200, target.status()
        if self.path == "/metrics":
            return 200, target.metrics()
        return 404, {"error": f"no route {self.path}"}

    def do_POST(self) -> None:
        self.answer(self._post)

    def _post(self) -> tuple[int, Any]:
        target = self.server.target
        body = self.json_body()
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
