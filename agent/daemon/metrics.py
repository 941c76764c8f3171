"""The daemon's Prometheus metrics, through ``prometheus-client`` (the exposition format, its
escaping and its types are the library's job, not ours). One registry per daemon."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, disable_created_metrics, generate_latest

from agent.core.outcomes import PassOutcome

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they are noise on a host agent


class Metrics:
    def __init__(self, paused: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter("llm_agent_runs", "Reconcile passes by result.", ["result"], registry=self.registry)
        self.failures = Counter("llm_agent_run_failures", "Reconcile passes that failed.", registry=self.registry)
        self.last_success = Gauge(
            "llm_agent_last_success_timestamp_seconds", "When the last pass converged.", registry=self.registry
        )
        self.drift = Counter(
            "llm_agent_drift_corrections",
            "Changes made to undo drift (desired state unchanged).",
            registry=self.registry,
        )
        self.apply = Summary(
            "llm_agent_apply_duration_seconds", "Time spent in passes that changed something.", registry=self.registry
        )
        paused_gauge = Gauge("llm_agent_paused", "Whether applying is paused.", registry=self.registry)
        paused_gauge.set_function(lambda: 1.0 if paused() else 0.0)
        for result in ("converged", "failed"):
            self.runs.labels(result=result)  # both series exist from the start, at 0

    def count(self, outcome: PassOutcome) -> None:
        if outcome is PassOutcome.CONVERGED:
            self.runs.labels(result="converged").inc()
            self.last_success.set_to_current_time()
        else:
            self.runs.labels(result="failed").inc()
            self.failures.inc()

    def changed(self, seconds: float, drift_corrections: int) -> None:
        self.apply.observe(seconds)
        if drift_corrections:
            self.drift.inc(drift_corrections)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
