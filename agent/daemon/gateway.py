"""The motoko agent's fleet duties, next to its reconcile passes.

- the fleet API (``agent.fleet.api``): node reports in, the fleet view out; its tokens are the
  hosts' ``report_token`` secrets of the commit last applied, so a rotation is a push;
- the routing loop (``agent.fleet.prober``): probes every local backend every 2 s; when the
  health map in effect changes it asks the daemon for a pass, which renders the proxy config
  with that health and reloads the proxy in place (SIGHUP; never a restart);
- the drain desk (``agent.fleet.drains``): leases asked by gpu_node agents before they replace
  their vLLM, granted by the capacity floor (``drain.max_out_per_chain``); a leased backend is
  taken out of routing by the loop, and the desk tells the node once the proxy serves without it;
- after every pass that reloaded the proxy: a check that the proxy serves exactly the
  deployments of the config now on disk (``agent.adapters.proxy``); a proxy that is not even
  ready by the deadline is restarted (gunicorn can freeze while it starts workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import proxy
from agent.adapters.secrets import SecretResolver
from agent.core.controller import STALE_AFTER_INTERVALS
from agent.core.errors import AgentError
from agent.core.outcomes import ActionKind
from agent.core.ports import Engine
from agent.core.redact import Redactor
from agent.core.rendered import project_name
from agent.core.routing import Health
from agent.fleet.api import FleetApi
from agent.fleet.drains import DrainContext
from agent.fleet.gateway import GatewayView
from agent.fleet.prober import ProbeFn, RoutingLoop, http_probe
from agent.node.reconcile import PassResult
from agent.node.settings import Settings
from agent.node.state import StateStore

log = structlog.get_logger("agent.gateway")

#: How long a reloaded proxy has to serve the new routing before it is checked for readiness.
SERVE_DEADLINE_S = 30.0
#: A proxy not serving the new routing is restarted only if it has not said it is ready once
#: in this long (a restart is an outage of a minute; a slow answer is not a dead proxy).
READY_WINDOW_S = 30.0
#: How long the proxy's spend, as read for ``agent status``, is reused (status stays fast).
SPEND_CACHE_S = 10.0


class GatewayDuty:
    def __init__(
        self,
        settings: Settings,
        redactor: Redactor,
        trigger: Callable[[], object],
        *,
        probe: ProbeFn = http_probe,
        serve_deadline_s: float = SERVE_DEADLINE_S,
    ) -> None:
        self.settings = settings
        self.redactor = redactor
        self.trigger = trigger
        self.probe = probe
        self.serve_deadline_s = serve_deadline_s
        #: how long a proxy that does not serve the new routing has to say it is ready at all
        #: before it is restarted
        self.ready_window_s = READY_WINDOW_S
        self.view: GatewayView | None = None
        self.api: FleetApi | None = None
        self.loop: RoutingLoop | None = None
        self.last_check: dict[str, Any] | None = None
        self.reloads = 0
        self._lock = threading.Lock()
        #: (when read, what the proxy said) for ``status``; read again after ``SPEND_CACHE_S``
        self._spend: tuple[float, dict[str, Any] | None] | None = None
        self.spend_clock: Callable[[], float] = time.monotonic
        #: the health map handed to the pass being run, and the one the proxy serves (the last
        #: pass that applied it went well): a drained backend is routed out once it is out here
        self._rendering: dict[str, Health] | None = None
        self.serving: dict[str, Health] = {}

    # ------------------------------------------------------------------ after each pass

    def prepare(self, path: Path, commit: str) -> None:
        """Before the first pass: the fleet API and the routing loop on ``commit``'s settings."""
        if self.view is None:
            self._load(path, commit)

    def after_pass(self, path: Path, commit: str, result: PassResult, engine: Engine) -> None:
        if self.view is None or self.view.commit != commit:
            self._load(path, commit)
        ok = True
        if self.view is not None and result.applied is not None:
            ok = self._check_reload(result, engine, self.view)
        if ok and result.error is None and self._rendering is not None:
            self.serving = dict(self._rendering)

    def _load(self, path: Path, commit: str) -> None:
        s = self.settings
        resolver = SecretResolver.for_repo(path, s.secrets_file, s.identity_file, self.redactor.add)
        try:
            view = GatewayView.load(path, commit, s.host, resolver)
        except AgentError as exc:
            log.error("fleet settings unusable; keeping the previous ones", error=self.redactor.scrub(str(exc)))
            return
        with self._lock:
            self.view = view
            self._serve_api(view)
            if self.loop is None:
                self.loop = RoutingLoop(
                    view, self._changed, self.api.store if self.api else None, self.probe, drains=self._drained
                )
                if self.api is not None:
                    self.api.registry.register(self.loop)  # routing series on the fleet API's /metrics
                self.loop.start()
            else:
                self.loop.set_view(view)
            if self.api is not None:
                self.api.drains.context = DrainContext.of(view.fleet, view.table)

    def _serve_api(self, view: GatewayView) -> None:
        if self.api is not None and self.api.address[1] != view.api_address[1]:
            self.api.close()
            self.api = None
        if self.api is None:
            try:
                self.api = FleetApi(self.settings.state_dir / "fleet.db", view.tokens, view.api_address)
            except (OSError, AgentError) as exc:
                log.error(
                    "fleet API cannot listen", address=f"{view.api_address[0]}:{view.api_address[1]}", error=str(exc)
                )
                return
            if self.loop is not None:
                self.api.registry.register(self.loop)
            self.api.drains.out_of_routing = self._out_of_routing
            self.api.drains.routed_out = self._routed_out
            self.api.view_source = self.status  # the fleet page (GET /, /v1/view)
            self.api.start()
            log.info("fleet API listening", url=self.api.url, hosts=sorted(view.tokens))
        else:
            try:
                self.api.set_tokens(view.tokens)
            except AgentError as exc:
                log.error("report tokens not changed", error=str(exc))

    def _changed(self, health: dict[str, Health]) -> None:
        """The routing loop's verdict changed: a pass renders and reloads with it."""
        self.trigger()

    def health(self) -> dict[str, Health] | None:
        """The health map the next pass renders the proxy config with."""
        self._rendering = self.loop.health() if self.loop is not None else None
        return self._rendering

    def _drained(self) -> frozenset[str]:
        return self.api.drains.drained_backends() if self.api is not None else frozenset()

    def _out_of_routing(self) -> dict[str, str]:
        return self.loop.out_of_routing() if self.loop is not None else {}

    def _routed_out(self, backends: frozenset[str]) -> bool:
        serving = self.serving
        return all(b in serving and not serving[b].healthy for b in backends)

    # ------------------------------------------------------------------ after a reload

    def _check_reload(self, result: PassResult, engine: Engine, view: GatewayView) -> bool:
        """After a pass that reloaded the proxy: does it serve the new routing? True: yes, or
        nothing was reloaded."""
        outcomes = result.applied.changed() if result.applied else []
        reloads = [o.action for o in outcomes if o.action.kind is ActionKind.RELOAD]
        if not reloads or not result.project:
            return True
        self.reloads += 1
        config = self._config_on_disk(result.project, view.proxy_config)
        if config is None:
            return False
        if result.reload_check is not None:  # the pass finished a rolling reload and checked it
            done = result.reload_check
            check = proxy.Serving(bool(done["ok"]), str(done["detail"]), float(done["seconds"]))
        else:
            expected = proxy.config_ids(config)
            key = proxy.master_key(config) or view.master_key
            check = proxy.wait_serving(view.proxy_url, key, expected, self.serve_deadline_s)
        self.last_check = {"ok": check.ok, "detail": check.detail, "seconds": round(check.seconds, 2)}
        if check.ok:
            log.info("proxy serves the new routing", seconds=round(check.seconds, 2))
            return True
        log.error("proxy does not serve the new routing", detail=check.detail)
        if not proxy.ready_within(view.proxy_url, self.ready_window_s):
            for action in reloads:
                if action.container:
                    log.warning("proxy not ready after its reload; restarting it", service=action.target)
                    engine.restart(action.container)
        return False

    def _master_key(self, view: GatewayView) -> str:
        """The key the proxy holds: the one of the config on disk (the one last applied: a
        rotation that was rolled back left the previous key there), else the commit's."""
        project = project_name(self.settings.host, self.settings.project_prefix)
        config = self._config_on_disk(project, view.proxy_config)
        return (proxy.master_key(config) if config else None) or view.master_key

    def _config_on_disk(self, project: str, relative: str) -> str | None:
        stack_dir = StateStore(self.settings.state_dir).stack_dir(project)
        try:
            return (stack_dir / relative).read_text(encoding="utf-8")
        except OSError:
            return None

    # ------------------------------------------------------------------ status, shutdown

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        view = self.view
        interval = view.fleet.report_interval_s if view is not None else None
        if self.api is not None:
            out["fleet"] = [_staleness(h, interval) for h in self.api.fleet()["hosts"]]
            out["fleet_api"] = self.api.url
        if interval is not None:
            out["report_interval_s"] = interval
        if self.loop is not None:
            out["routing_state"] = self.loop.snapshot()
        if self.api is not None:
            out["drains"] = self.api.drains.view()
        if self.last_check is not None:
            out["last_reload_check"] = self.last_check
        if view is not None:
            out["spend"] = self.spend(view)
        return out

    def spend(self, view: GatewayView) -> dict[str, Any]:
        """The OpenAI budget and what the proxy counts as spent (``spent_usd`` None: unknown),
        read at most every ``SPEND_CACHE_S``."""
        cached, now = self._spend, self.spend_clock()
        if cached is None or now - cached[0] >= SPEND_CACHE_S:
            cached = self._spend = (now, proxy.provider_spend(view.proxy_url, self._master_key(view)))
        out: dict[str, Any] = {"budget_usd": view.fleet.openai_budget_monthly_usd, "spent_usd": None, "period": "1mo"}
        if cached[1] is not None:
            out.update({k: v for k, v in cached[1].items() if v is not None and v != ""})
        return out

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        if self.api is not None:
            self.api.close()


def _staleness(host: dict[str, Any], interval_s: float | None) -> dict[str, Any]:
    """A host of the fleet view with ``stale``: its last report older than three intervals."""
    if not host.get("reported") or interval_s is None:
        return host
    return {**host, "stale": float(host.get("age_s") or 0.0) > STALE_AFTER_INTERVALS * interval_s}
