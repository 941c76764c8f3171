"""A gpu_node agent's fleet duty: judge its own backend and report it to motoko.

After every pass (and every ``report_interval_s`` in between, on its own thread) the duty
probes the host's vLLM on its published port (``/health``, ``/v1/models``, a one-token
streamed canary, ``/metrics``), reads the container's state and last log lines, reads the GPUs
through NVML (``unknown`` where there is none), judges the stage (``agent.core.health``) and
hands the result to the reporter (``agent.node.reporter``), which sends it to motoko with the
host's own token and never blocks the pass. A changed stage is sent at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import nvml
from agent.adapters.secrets import SecretResolver
from agent.adapters.vllm import probe_backend
from agent.core.errors import AgentError, EngineError
from agent.core.health import Stage
from agent.core.model import GpuNodeVars
from agent.core.ports import Engine
from agent.core.redact import Redactor
from agent.core.report import MAX_PROBLEM
from agent.desired.load import load_desired
from agent.node.reconcile import PassResult
from agent.node.reporter import Reporter, ReportFields, judged
from agent.node.settings import Settings

log = structlog.get_logger("agent.node")

#: The service of the gpu_node role that runs vLLM.
BACKEND_SERVICE = "vllm"


@dataclass(frozen=True)
class Local:
    """What this host serves, from the commit last applied."""

    commit: str
    role: str
    api_base: str
    served_name: str
    gpu_count: int | str
    url: str
    token: str
    interval_s: float


class NodeDuty:
    def __init__(self, settings: Settings, redactor: Redactor, probe_timeout_s: float = 2.0) -> None:
        self.settings = settings
        self.redactor = redactor
        self.probe_timeout_s = probe_timeout_s
        self.local: Local | None = None
        self.reporter: Reporter | None = None
        self.fields: ReportFields | None = None
        self.container: str | None = None
        #: the backend container's name (a replaced container keeps it; its id changes)
        self.container_name: str | None = None
        #: the drain is under way (set by the pass's drain): reports say ``draining``
        self.draining = False
        #: the last pass failed: what motoko is told (``None`` once a pass converged)
        self.problem: str | None = None
        self._engine: Engine | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def pass_failed(self, result: PassResult) -> None:
        """A pass failed (a desired state that does not load, an image that cannot be pulled...):
        motoko hears it with the next report, sent at once. What runs is what the last good
        pass left, and the report says so (its commit, its stage)."""
        failure = result.failure.value if result.failure else "failed"
        self.problem = problem_line(result.commit, failure, result.error or "")
        self.refresh()

    def after_pass(self, path: Path, commit: str, result: PassResult, engine: Engine) -> None:
        self.problem = None
        if self.local is None or self.local.commit != commit:
            self._load(path, commit, result.role or "")
        info = result.services.get(BACKEND_SERVICE) or {}
        self.container = info.get("container") or self.container
        self.container_name = info.get("container_name") or self.container_name
        self._engine = engine
        self.refresh(commit=commit)
        if self._thread is None and self.reporter is not None:
            self._thread = threading.Thread(target=self._run, name="node-health", daemon=True)
            self._thread.start()

    def _load(self, path: Path, commit: str, role: str) -> None:
        s = self.settings
        try:
            desired = load_desired(path)
            host = desired.host(s.host)
        except AgentError as exc:
            log.error("cannot read this host's backend settings", error=self.redactor.scrub(str(exc)))
            return
        if not isinstance(host.vars, GpuNodeVars):
            return
        v = host.vars
        url = s.motoko_url or desired.motoko_url()
        token = ""
        if v.report_token is not None:
            resolver = SecretResolver.for_repo(path, s.secrets_file, s.identity_file, self.redactor.add)
            try:
                token = resolver.value(v.report_token.secret)
            except AgentError as exc:
                log.error("report token unavailable; not reporting", error=self.redactor.scrub(str(exc)))
        self.local = Local(
            commit=commit,
            role=host.role,
            api_base=f"http://127.0.0.1:{v.published_port}/v1",
            served_name=v.served_name,
            gpu_count=v.gpu_count,
            url=url or "",
            token=token,
            interval_s=desired.fleet.report_interval_s,
        )
        self._reporting(self.local)

    def _reporting(self, local: Local) -> None:
        if not local.url or not local.token:
            if self.reporter is not None:
                self.reporter.stop()
                self.reporter = None
            log.info("not reporting to motoko", why="no report_token" if not local.token else "no motoko_url")
            return
        if self.reporter is None:
            # Retries back off up to one report interval, no further: a motoko that comes up
            # (or back) hears from every node within an interval, not after a minute's backoff.
            self.reporter = Reporter(
                local.url, self.settings.host, local.token, local.interval_s, max_backoff_s=local.interval_s
            )
            self.reporter.start()
            log.info("reporting to motoko", url=local.url, every_s=local.interval_s)
        else:
            self.reporter.set_url(local.url)
            self.reporter.set_token(local.token)

    def refresh(self, commit: str | None = None, draining: bool | None = None) -> ReportFields | None:
        """Probe, judge, hand to the reporter; the fields reported."""
        if draining is not None:
            self.draining = draining
        draining = self.draining
        local = self.local
        if local is None:
            return None
        health = probe_backend(local.api_base, local.served_name, self.probe_timeout_s)
        state, tail = self._container()
        fields = ReportFields(
            role=local.role,
            commit=_short(commit or local.commit),
            health=health,
            gpu=nvml.probe(local.gpu_count),
            services={BACKEND_SERVICE: state or "missing"},
            problem=self.problem,
        )
        fields = judged(fields, state, tail, draining=draining)
        with self._lock:
            before = self.fields
            self.fields = fields
        if self.reporter is not None:
            self.reporter.update(fields)
            if (
                before is None
                or before.stage != fields.stage
                or before.commit != fields.commit
                or before.problem != fields.problem
            ):
                self.reporter.changed()
                log.info("backend stage", stage=fields.stage.value, health=health.reason)
        return fields

    def _container(self) -> tuple[str | None, str]:
        if self._engine is None:
            return None, ""
        # By id first; a container replaced since the last pass is found by its name.
        for ref in (self.container, self.container_name):
            if ref is None:
                continue
            try:
                state = self._engine.state(ref)[0]
                return state, self._engine.logs_tail(ref, 20)
            except EngineError:
                continue
        return None, ""

    def _run(self) -> None:
        while not self._stop.wait(self.local.interval_s if self.local else 10.0):
            try:
                self.refresh()
            except Exception as exc:  # the node's health loop must outlive one bad round
                log.error("health round failed", error=f"{type(exc).__name__}: {exc}")

    def status(self) -> dict[str, Any]:
        f = self.fields
        out: dict[str, Any] = {"stage": f.stage.value if f else Stage.UNKNOWN.value}
        if f is not None and f.health is not None:
            out["backend"] = f.health.reason
            out["load"] = f.health.load.model_dump()
        if f is not None and f.gpu is not None:
            out["gpu"] = f.gpu.summary()
        if self.reporter is not None:
            r = self.reporter
            last = r.last_result
            out["reporting"] = {
                "to": self.local.url if self.local else None,
                "delivered": r.delivered,
                "attempts": r.attempts,
                "every_s": r.interval_s,
                "last": None if last is None else {"ok": last.delivered, "status": last.status, "detail": last.detail},
            }
        return out

    def close(self) -> None:
        self._stop.set()
        if self.reporter is not None:
            self.reporter.stop()


def _short(commit: str) -> str | None:
    """A commit id as a report carries it (hex only: a dirty working tree's ``+dirty`` is cut)."""
    head = commit.split("+", maxsplit=1)[0]
    return head if head and all(c in "0123456789abcdef" for c in head) and len(head) >= 7 else None


def problem_line(commit: str, failure: str, error: str) -> str:
    """One line for motoko's fleet view: the commit, the failure kind, the error (cut to fit a
    report's ``problem``)."""
    where = f"on {commit[:12]} " if commit else ""
    line = " ".join(f"last pass {where}failed ({failure}): {error}".split())
    return line if len(line) <= MAX_PROBLEM else line[: MAX_PROBLEM - 3] + "..."
