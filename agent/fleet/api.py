"""The motoko agent's fleet API: every host's agent reports here; the fleet view is read here.

Served over TCP by the agent's one HTTP stack (``agent.adapters.httpserver``, shared with the
control socket). Routes:

- ``POST /v1/reports``: a ``NodeReport`` (``agent.core.report``), with the reporting host's own
  token: ``Authorization: Bearer <token>``. 200 when accepted; refused without changing
  anything: 401 no or unknown token, 413 body over 64 KiB (from its Content-Length alone),
  400 not JSON / not an object / not a valid report (one line naming the field), 403 a report
  for another host, 422 ``sent_at`` outside the window, 409 a replay;
- ``GET /v1/fleet``: per host its last report's age, role, commit, stage, health, GPU and load;
  hosts with a token that never reported are listed with ``reported: false``;
- ``GET /metrics``: Prometheus text: reports accepted per host, refused by reason, report age;
- ``POST /v1/drains`` / ``DELETE /v1/drains`` (the host's token; ``agent.fleet.drains``): a drain
  lease on the host's backends asked or renewed (200, or 409 with why it must wait), given back;
  ``GET /v1/drains``: the rollout, leases held and hosts waiting.
- ``GET /`` (and ``/fleet``): the fleet page (``agent.fleet.page``), read-only; it polls
- ``GET /v1/view``: what ``view_source`` returns (the gateway duty's status: hosts, routing,
  drains, events, spend) with the server's ``now``; without a ``view_source``, the hosts alone.
  A ``view_source`` that fails is a 503 (the page shows its banner and keeps its last data).

Reading (the fleet view, the page, /metrics) needs no token, like ``agent status`` on the LAN;
reports and drain requests are authenticated. Nothing here changes the fleet but those.

``FleetApi(db_path, tokens)`` then ``start()`` / ``close()``, like ``ControlServer``;
``set_tokens`` swaps the tokens (a rotation pushed through the desired state).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from agent.adapters.httpserver import BadRequest, JsonHandler, TcpServer
from agent.core.errors import ConfigError, error_line
from agent.core.report import DEFAULT_WINDOW_S, NodeReport, Rejected, Rejection
from agent.fleet import page
from agent.fleet.drains import DrainDesk, DrainRefused
from agent.fleet.store import FleetStore, HostRecord

log = structlog.get_logger("agent.fleet")

#: Refusals before a report is judged, next to ``Rejection``'s (each a ``reason`` label).
UNAUTHENTICATED = "unauthenticated"
TOO_LARGE = "too_large"
INVALID = "invalid"
REASONS = (UNAUTHENTICATED, TOO_LARGE, INVALID, *(r.value for r in Rejection))
#: Where the fleet page is served (the query string, if any, is ignored).
PAGE_PATHS = ("/", "/fleet")
STATUS_OF = {
    Rejection.WRONG_HOST: 403,
    Rejection.STALE: 422,
    Rejection.FUTURE: 422,
    Rejection.REPLAY: 409,
}


class Refused(BadRequest):
    """A report refused: its HTTP code and the ``reason`` label it is counted under."""

    def __init__(self, message: str, code: int, reason: str) -> None:
        super().__init__(message, code)
        self.reason = reason


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class FleetApi:
    def __init__(
        self,
        db_path: Path,
        tokens: Mapping[str, str],
        address: tuple[str, int] = ("127.0.0.1", 0),
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        #: What ``GET /v1/view`` (the fleet page) shows; set by the gateway duty to its ``status``.
        self.view_source: Callable[[], dict[str, Any]] | None = None
        self._by_digest: dict[bytes, str] = {}
        self._tokens: dict[str, str] = {}
        self.set_tokens(tokens)
        self.store = FleetStore(db_path)
        self.drains = DrainDesk(self.store, clock)
        self.registry = CollectorRegistry(auto_describe=True)
        self.rejected = Counter(
            "llm_fleet_reports_rejected", "Reports refused, by reason.", ["reason"], registry=self.registry
        )
        for reason in REASONS:
            self.rejected.labels(reason=reason)  # every series exists from the start, at 0
        self.registry.register(_StoreCollector(self))
        try:
            self.server = TcpServer(address, _Handler)
        except OSError:
            self.store.close()
            raise
        self.server.log_name = "agent.fleet"
        self.server.api = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, name="fleet-api", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self.store.close()

    def set_tokens(self, tokens: Mapping[str, str]) -> None:
        """Host -> its report token; replaces the previous set at once."""
        by_digest: dict[bytes, str] = {}
        for host, token in tokens.items():
            if not token:
                raise ConfigError(f"host {host!r}: empty report token")
            other = by_digest.setdefault(_digest(token), host)
            if other != host:
                raise ConfigError(f"hosts {other!r} and {host!r} share a report token; each needs its own")
        self._tokens, self._by_digest = dict(tokens), by_digest

    # ------------------------------------------------------------------ the routes' logic

    def authenticate(self, authorization: str | None) -> str:
        """The host whose token the ``Authorization`` header carries."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refused("a bearer token is required (Authorization: Bearer <token>)", 401, UNAUTHENTICATED)
        host = self._by_digest.get(_digest(token))
        # The digest finds the candidate; the comparison itself is constant-time.
        if host is None or not hmac.compare_digest(token.encode(), self._tokens[host].encode()):
            raise Refused("unknown token", 401, UNAUTHENTICATED)
        return host

    def submit(self, host: str, raw: bytes) -> dict[str, Any]:
        """Parse, judge and store one report of the authenticated ``host``."""
        report = parse_report(raw)
        verdict = self.store.submit(report, host, self.clock(), self.window_s)
        if isinstance(verdict, Rejected):
            raise Refused(verdict.detail, STATUS_OF[verdict.reason], verdict.reason.value)
        return {"accepted": True, "host": host, "boot_id": report.boot_id, "seq": report.seq}

    def refused(self, exc: BadRequest, peer: str) -> None:
        reason = exc.reason if isinstance(exc, Refused) else TOO_LARGE if exc.code == 413 else INVALID
        self.rejected.labels(reason=reason).inc()
        level = log.warning if reason == Rejection.WRONG_HOST else log.debug
        level("report refused", reason=reason, peer=peer, error=str(exc))

    def fleet(self) -> dict[str, Any]:
        now = self.clock()
        records = {r.report.host: r for r in self.store.hosts()}
        names = sorted(set(records) | set(self._tokens))
        hosts = [host_view(records[h], now) if h in records else {"host": h, "reported": False} for h in names]
        return {"now": now, "hosts": hosts}

    def metrics(self) -> str:
        return generate_latest(self.registry).decode()

    def view(self) -> dict[str, Any]:
        """The fleet page's data: ``view_source()`` (else the hosts alone) and the server's ``now``."""
        source = self.view_source
        if source is None:
            fleet = self.fleet()
            return {"now": fleet["now"], "fleet": fleet["hosts"]}
        try:
            data = source()
        except Exception as exc:
            log.warning("fleet view failed", error=error_line(exc))
            raise BadRequest(f"fleet view unavailable: {error_line(exc)}", 503) from None
        return {"now": self.clock(), **data}


def parse_report(raw: bytes) -> NodeReport:
    try:
        return NodeReport.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise Refused(_one_line(exc), 400, INVALID) from None


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return "body is not JSON"
    if first["type"] == "model_type" and not first["loc"]:
        return "body must be a JSON object"
    where = ".".join(str(part) for part in first["loc"]) or "report"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid report: {where}: {first['msg']}{more}"


def host_view(record: HostRecord, now: float) -> dict[str, Any]:
    r = record.report
    health = r.health
    return {
        "host": r.host,
        "reported": True,
        "role": r.role,
        "commit": r.commit,
        "stage": r.stage.value,
        "age_s": round(max(0.0, now - record.received_at), 3),
        "received_at": record.received_at,
        "ready": health.ready if health else None,
        "health": health.reason if health else None,
        "load": health.load.model_dump() if health else None,
        "gpu": r.gpu.summary() if r.gpu else None,
        "gpu_status": r.gpu.status if r.gpu else None,
        "services": r.services,
        "problem": r.problem,
        "agent_version": r.agent_version,
        "boot_id": r.boot_id,
        "seq": r.seq,
        "reports": record.accepted,
        "boots": record.boots,
    }


class _StoreCollector(Collector):
    """Series read from the store at each scrape, so they survive a restart."""

    def __init__(self, api: FleetApi) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        accepted = CounterMetricFamily("llm_fleet_reports_accepted", "Reports accepted, by host.", labels=["host"])
        for host, count in self.api.store.accepted_counts().items():
            accepted.add_metric([host], count)
        age = GaugeMetricFamily("llm_fleet_report_age_seconds", "Seconds since a host's last report.", labels=["host"])
        for host, seconds in self.api.store.ages(self.api.clock()).items():
            age.add_metric([host], seconds)
        leases = GaugeMetricFamily(
            "llm_fleet_drain_lease", "1 while a host holds an active drain lease.", labels=["host"]
        )
        now = self.api.clock()
        for lease in self.api.store.leases():
            leases.add_metric([lease.host], 1.0 if lease.active(now) else 0.0)
        yield accepted
        yield age
        yield leases


class _Handler(JsonHandler):
    log_name = "agent.fleet"
    #: Headers and body go out as two writes: with Nagle, each answer waits for a delayed ACK (40 ms).
    disable_nagle_algorithm = True

    @property
    def api(self) -> FleetApi:
        api: FleetApi = self.server.api  # type: ignore[attr-defined]
        return api

    def do_GET(self) -> None:
        if self.path.partition("?")[0] in PAGE_PATHS:
            self.send_body(200, page.PAGE_BYTES, page.CONTENT_TYPE, page.HEADERS)
            return
        self.answer(self._get)

    def _get(self) -> tuple[int, Any]:
        if self.path == "/v1/fleet":
            return 200, self.api.fleet()
        if self.path == "/v1/view":
            return 200, self.api.view()
        if self.path == "/metrics":
            return 200, self.api.metrics()
        if self.path == "/v1/drains":
            return 200, self.api.drains.view()
        return 404, {"error": f"no route {self.path}"}

    def do_POST(self) -> None:
        self.answer(self._post)

    def _post(self) -> tuple[int, Any]:
        if self.path == "/v1/drains":
            return self._drain(self.api.drains.ask)
        if self.path != "/v1/reports":
            # An error closes the connection: the body, unread, must not be taken for a request.
            raise BadRequest(f"no route {self.path}", 404)
        try:
            raw = self.read_body()  # first (bounded): a refused client still gets its answer, not a reset
            host = self.api.authenticate(self.headers.get("Authorization"))
            return 200, self.api.submit(host, raw)
        except BadRequest as exc:
            self.api.refused(exc, peer=str(self.client_address[0]))
            raise

    def do_DELETE(self) -> None:
        self.answer(self._delete)

    def _delete(self) -> tuple[int, Any]:
        if self.path != "/v1/drains":
            return 404, {"error": f"no route {self.path}"}
        return self._drain(lambda host, raw: self.api.drains.release(host))

    def _drain(self, act: Callable[[str, bytes], dict[str, Any]]) -> tuple[int, Any]:
        """A drain request: the same token and body rules as a report; the host is the token's."""
        raw = self.read_body()
        host = self.api.authenticate(self.headers.get("Authorization"))
        try:
            return 200, act(host, raw)
        except DrainRefused as exc:
            return exc.code, {"error": str(exc), "granted": False}
