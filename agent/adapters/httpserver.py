"""The one HTTP stack the agent serves: the standard library's ``http.server``, hardened.

Used by the daemon's control socket (``agent.daemon.control``, over a Unix socket) and the
motoko agent's fleet API (``agent.fleet.api``, over TCP). What both get from here:

- every answer JSON, errors included (``{"error": "one line"}``), never an HTML page or a
  traceback on stderr (which is the journal);
- HTTP/1.1, HTTP/0.9 refused, an idle or slow client cut off after ``timeout`` seconds;
- bodies by ``Content-Length`` only, bounded: a body over the limit is answered 413 from its
  headers alone, without reading it;
- a listen backlog of 128 (socketserver's default of 5 refuses bursts).

A handler subclasses ``JsonHandler`` and answers with ``self.answer(route)``, where ``route``
returns ``(status, data)``: a ``str`` is sent as Prometheus text, anything else as JSON; it
raises ``BadRequest`` for a client's mistake.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import sys
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from agent.core.errors import error_line

#: Connections waiting to be accepted: ``agent status`` from many shells (or a monitoring
#: burst, or a thousand agents reporting) must not be refused (socketserver's default is 5).
BACKLOG = 128
MAX_BODY = 64 * 1024
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


class BadRequest(Exception):
    """A request we answer with an error (400 unless told) and then close the connection."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


class _Quiet:
    """``handle_error`` as one log line instead of socketserver's traceback on stderr."""

    log_name = "agent.http"

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        log = structlog.get_logger(self.log_name)
        level = log.debug if isinstance(exc, ConnectionError | TimeoutError) else log.warning
        with contextlib.suppress(Exception):  # the last resort must not raise (a closed log stream)
            level("connection failed", error=error_line(exc) if exc else "unknown")


class UnixServer(_Quiet, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = BACKLOG


class TcpServer(_Quiet, socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Seconds a connection may sit idle or send its body slowly (a stuck client holds a thread).
    timeout = 10.0
    max_body = MAX_BODY
    log_name = "agent.http"

    def log_message(self, format: str, *args: Any) -> None:  # the caller logs what matters
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

    def send_body(
        self, code: int, body: bytes, ctype: str = "application/json", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def answer(self, route: Callable[[], tuple[int, Any]]) -> None:
        """Run ``route``: a bad request is its code (400 unless told), a failure a 500 (one line)."""
        try:
            code, data = route()
        except BadRequest as exc:
            self.send_error(exc.code, str(exc))
            return
        except Exception as exc:
            error = error_line(exc)
            structlog.get_logger(self.log_name).warning("request failed", path=self.path, error=error)
            self.send_error(500, error)
            return
        if isinstance(data, str):
            self.send_body(code, data.encode(), PROMETHEUS_TEXT)
        else:
            self.send_body(code, json.dumps(data).encode())

    def read_body(self) -> bytes:
        """The request's body by its ``Content-Length`` (none: empty), at most ``max_body`` bytes:
        a longer one is refused (413) from the header alone."""
        if "Transfer-Encoding" in self.headers:
            raise BadRequest("Transfer-Encoding is not supported; send a Content-Length")
        raw_length = (self.headers.get("Content-Length") or "0").strip()
        if not (raw_length.isascii() and raw_length.isdigit()):  # no sign, no '1e3', no '²'
            raise BadRequest(f"Content-Length must be a non-negative integer, not {raw_length[:40]!r}")
        length = int(raw_length)
        if length > self.max_body:
            raise BadRequest(f"body too large ({length} bytes; at most {self.max_body})", 413)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raw = b""
        if len(raw) < length:
            raise BadRequest(f"body shorter than its Content-Length ({len(raw)} of {length} bytes)")
        return raw

    def json_body(self) -> dict[str, Any]:
        """The request's body: a JSON object (none at all reads as ``{}``)."""
        raw = self.read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(f"body must be a JSON object, not {type(body).__name__}")
        return body
