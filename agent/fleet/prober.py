"""The motoko agent's routing loop: probe every local backend, judge, and ask for a reload.

Every ``routing.watch_interval_s`` (2 s) a round probes each local backend at once, each probe
bounded by ``routing.watch_timeout_s`` (2 s: a hang, or a stream stalled after its headers,
fails within it), reads each reporting host's latest report from the fleet store, and feeds
both to the pure controller (``agent.core.controller``). When the controller says the health
map in effect changed (after its damping window), ``on_change(health)`` is called: the daemon
renders the proxy config with that health and reloads the proxy (SIGHUP, never a restart).

``tick()`` is one round, synchronous (the tests drive it); ``start()`` runs rounds on a thread.
Every change of a backend (in, out, why) is kept as an event for ``agent status``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.adapters.vllm import probe_backend
from agent.core.controller import Controller, Probe, ReportState, classify_report
from agent.core.health import BackendHealth
from agent.core.routing import Health
from agent.fleet.gateway import GatewayView, Target
from agent.fleet.store import FleetStore, HostRecord

log = structlog.get_logger("agent.routing")

ProbeFn = Callable[[Target, float], BackendHealth]
#: Routing events kept for ``agent status``.
MAX_EVENTS = 50


def http_probe(target: Target, timeout_s: float) -> BackendHealth:
    return probe_backend(target.api_base, target.served_name, timeout_s)


@dataclass(frozen=True)
class RoutingEvent:
    at: float  # epoch seconds
    backend: str
    in_routing: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "backend": self.backend,
            "change": "in" if self.in_routing else "out",
            "why": self.reason,
        }


def _controller(view: GatewayView) -> Controller:
    policy = view.fleet.routing
    return Controller(policy, [t.name for t in view.targets], policy.damping_s)


class RoutingLoop:
    def __init__(
        self,
        view: GatewayView,
        on_change: Callable[[dict[str, Health]], None],
        store: FleetStore | None = None,
        probe: ProbeFn = http_probe,
        clock: Callable[[], float] = time.time,
        drains: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.on_change = on_change
        #: backends under a drain lease now (out of routing until the lease is given back)
        self.drains = drains
        self.store = store
        self.probe = probe
        self.clock = clock
        self.started_at = clock()
        self.view = view
        self.controller = _controller(view)
        self.events: deque[RoutingEvent] = deque(maxlen=MAX_EVENTS)
        self.last_probes: dict[str, BackendHealth] = {}
        self.rounds = 0
        #: for the metrics: probes that failed, by backend; health maps applied (reloads asked)
        self.probe_failures: dict[str, int] = {}
        self.changes = 0
        self._applied: dict[str, Health] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")

    # ------------------------------------------------------------------ the daemon's side

    def set_view(self, view: GatewayView) -> None:
        """A new commit: new policy, new targets. Known backends keep their state."""
        with self._lock:
            old = self.controller
            self.controller = Controller(
                view.fleet.routing, [t.name for t in view.targets], view.fleet.routing.damping_s
            )
            self.controller.adopt(old)
            self.view = view

    def health(self) -> dict[str, Health]:
        """The health map the proxy config should be rendered with now (what was last applied)."""
        with self._lock:
            return dict(self._applied)

    def out_of_routing(self) -> dict[str, str]:
        """backend -> why, for every backend out of routing now."""
        with self._lock:
            return {n: st.reason or "out" for n, st in self.controller.states.items() if not st.in_routing}

    def start(self) -> RoutingLoop:
        self._thread = threading.Thread(target=self._run, name="routing", daemon=True)
        self._thread.start()
        return self

    def stop(self, join_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(join_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one round

    def tick(self) -> dict[str, Health] | None:
        view = self.view
        now = self.clock()
        probes = self._probe_all(view.targets, view.fleet.routing.watch_timeout_s)
        reports = self._reports(view, now)
        try:
            drained = self.drains()
        except Exception as exc:  # the store unreadable: the leases held stay as they were
            log.error("drain leases unreadable", error=f"{type(exc).__name__}: {exc}")
            drained = frozenset(n for n, st in self.controller.states.items() if st.drained)
        round_probes = {
            t.name: Probe(h.ready, h.reason, reports.get(t.reporting_host) if t.reporting_host else None)
            for t, h in zip(view.targets, (probes[t.name] for t in view.targets), strict=True)
        }
        with self._lock:
            before = dict(self.controller.states)
            changed = self.controller.step(self.clock(), round_probes, drained)
            after = dict(self.controller.states)
            if changed is not None:
                self._applied = changed
            self.last_probes = probes
            self.rounds += 1
            for name, h in probes.items():
                self.probe_failures[name] = self.probe_failures.get(name, 0) + (not h.ready)
            self.changes += changed is not None
        self._note_events(before, after)
        if changed is not None:
            out = sorted(n for n, h in changed.items() if not h.healthy)
            log.info("routing changes", out=out)
            self.on_change(changed)
        return changed

    def _probe_all(self, targets: list[Target], timeout_s: float) -> dict[str, BackendHealth]:
        futures = {t.name: self._pool.submit(self.probe, t, timeout_s) for t in targets}
        out: dict[str, BackendHealth] = {}
        for name, future in futures.items():
            try:
                out[name] = future.result(timeout=timeout_s * 4 + 1)
            except Exception as exc:  # a probe bug or a wedged probe is a failed probe, not a dead loop
                out[name] = BackendHealth.failed(f"probe error: {type(exc).__name__}: {exc}"[:200])
        return out

    def _reports(self, view: GatewayView, now: float) -> dict[str, ReportState]:
        if self.store is None:
            return {}
        records: Mapping[str, HostRecord] = {r.report.host: r for r in self.store.hosts()}
        interval = view.fleet.report_interval_s
        out: dict[str, ReportState] = {}
        for t in view.targets:
            if t.reporting_host is None:
                continue
            rec = records.get(t.reporting_host)
            if rec is None:
                # Never reported: it may be starting; judged by probes until it does (or until
                # this agent has waited three intervals for it).
                out[t.reporting_host] = ReportState.STALE if now - self.started_at > 3 * interval else ReportState.FRESH
                continue
            # A restarted motoko agent gives every host a fresh start before calling it stale.
            received = max(rec.received_at, self.started_at)
            out[t.reporting_host] = classify_report(rec.report, received, now, interval)
        return out

    def _note_events(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        for name, state in after.items():
            old = before.get(name)
            if old is not None and old.in_routing != state.in_routing:
                event = RoutingEvent(self.clock(), name, state.in_routing, state.reason)
                self.events.append(event)
                (log.info if state.in_routing else log.warning)(
                    "backend in routing" if state.in_routing else "backend out of routing",
                    backend=name,
                    why=state.reason,
                )

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # the loop must outlive any one bad round
                log.error("routing round failed", error=f"{type(exc).__name__}: {exc}")
            wait = self.view.fleet.routing.watch_interval_s - (time.monotonic() - began)
            self._stop.wait(max(0.05, wait))

    # ------------------------------------------------------------------ for status and metrics

    def collect(self) -> Iterator[Metric]:
        """Prometheus series (registered on the fleet API's registry by the gateway duty)."""
        with self._lock:
            states = dict(self.controller.states)
            failures = dict(self.probe_failures)
            changes, rounds = self.changes, self.rounds
        in_routing = GaugeMetricFamily(
            "llm_routing_backend_in", "1 while a backend is in routing, 0 while out.", labels=["backend"]
        )
        for name, st in sorted(states.items()):
            in_routing.add_metric([name], 1.0 if st.in_routing else 0.0)
        failed = CounterMetricFamily(
            "llm_routing_probe_failures", "Probes of a backend that failed.", labels=["backend"]
        )
        for name, count in sorted(failures.items()):
            failed.add_metric([name], count)
        yield in_routing
        yield failed
        yield CounterMetricFamily("llm_routing_changes", "Routing changes applied (each one reload).", value=changes)
        yield CounterMetricFamily("llm_routing_probe_rounds", "Probe rounds run.", value=rounds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            states = dict(self.controller.states)
            probes = dict(self.last_probes)
        return {
            "backends": {
                name: {
                    "in_routing": s.in_routing,
                    "since": s.since,
                    "why": s.reason or ("healthy" if s.in_routing else "out"),
                    "failures": s.failures,
                    "probe": probes[name].reason if name in probes else None,
                    "load": probes[name].load.model_dump() if name in probes else None,
                }
                for name, s in sorted(states.items())
            },
            "events": [e.as_dict() for e in reversed(self.events)],
            "rounds": self.rounds,
        }
