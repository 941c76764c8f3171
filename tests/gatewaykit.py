"""The motoko agent's routing in front of the real LiteLLM proxy, without Docker (tests, bench).

``ProcessGateway`` runs the agent's own ``RoutingLoop`` (real probes, real controller) and on
each health change does what a pass does on motoko: render the proxy config with that health
(``render_host``, the same code), replace the file by rename, and reload the gunicorn master
worker by worker (SIGTTIN, then SIGTTOU once a worker serves the new routing). The proxy is a process here (from the
cached venv, ``--run_gunicorn``), the backends are fake vLLM processes on loopback.

With ``drains=True`` it also runs the fleet API's drain desk (``agent.fleet.drains``, on a real
port, leases in SQLite) as the motoko agent does: leased backends leave the routing, and the
desk says ``routed_out`` once a reload without them was served; ``drain_gate(host)`` is a
gpu_node's ``FleetDrain`` asking it over HTTP.

``Load`` sends requests at a fixed rate from a thread pool and records every outcome.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from agent.adapters import proxy
from agent.adapters.fleetclient import HttpxDrains
from agent.adapters.fs import write_atomic
from agent.adapters.secrets import SecretResolver
from agent.core.routing import Health
from agent.desired.load import load_desired
from agent.desired.render import render_host
from agent.fleet.api import FleetApi
from agent.fleet.drains import DrainContext
from agent.fleet.gateway import GatewayView
from agent.fleet.prober import RoutingLoop
from agent.node.drain import DrainHooks, DrainTarget, FleetDrain
from tests.conftest import DEMO_IDENTITY
from tests.proxykit import Proc


@dataclass
class Reload:
    at: float
    out: list[str]
    served_after_s: float
    ok: bool
    detail: str = ""


class ProcessGateway:
    def __init__(self, repo: Path, config: Path, proxy_proc: Proc, token: str, drains: bool = False) -> None:
        self.repo, self.config, self.proxy, self.token = repo, config, proxy_proc, token
        self.resolver = SecretResolver.for_repo(repo, Path("/nonexistent"), DEMO_IDENTITY)
        self.view = GatewayView.load(repo, "test", "motoko", self.resolver)
        self.view = replace(self.view, proxy_url=f"http://127.0.0.1:{proxy_proc.port}")
        self.reloads: list[Reload] = []
        self.master_pid = proxy_proc.proc.pid
        #: the health map the proxy serves (its last reload was served)
        self.serving: dict[str, Health] = {}
        self.api: FleetApi | None = None
        self._clients: list[HttpxDrains] = []
        if drains:
            self.api = FleetApi(config.parent / "fleet.db", self.view.tokens)
            self.api.drains.context = DrainContext.of(self.view.fleet, self.view.table)
            self.api.drains.routed_out = lambda names: all(
                n in self.serving and not self.serving[n].healthy for n in names
            )
        drained = self.api.drains.drained_backends if self.api is not None else frozenset
        # No node reports here (no store for the loop): probes alone judge the backends.
        self.loop = RoutingLoop(self.view, self.apply, None, drains=drained)
        if self.api is not None:
            self.api.drains.out_of_routing = self.loop.out_of_routing

    def apply(self, health: dict[str, Health]) -> None:
        at = time.monotonic()
        rendered = render_host(load_desired(self.repo), "motoko", self.resolver, reveal=True, health=health)
        text = rendered.stack.files[self.view.proxy_config].content
        write_atomic(self.config, text.encode(), 0o600)
        # What the gateway role's reload is (roles/motoko/role.yaml, agent.node.reconcile):
        # one more worker on the new config, then the oldest retired once it serves it.
        os.kill(self.master_pid, signal.SIGTTIN)
        check = proxy.rolling_reload(
            self.view.proxy_url,
            self.token,
            proxy.config_ids(text),
            lambda: os.kill(self.master_pid, signal.SIGTTOU),
            60,
        )
        out = sorted(n for n, h in health.items() if not h.healthy)
        self.reloads.append(Reload(at, out, check.seconds, check.ok, check.detail))
        if check.ok:
            self.serving = dict(health)

    def start(self) -> ProcessGateway:
        if self.api is not None:
            self.api.start()
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()
        for client in self._clients:
            client.close()
        if self.api is not None:
            self.api.close()

    def drain_gate(self, host: str, api_base: str, served: str, say: Callable[[str], None] = print) -> FleetDrain:
        """``host``'s drain, as its agent does it: over HTTP to this gateway's desk."""
        assert self.api is not None, "ProcessGateway(drains=True)"
        fleet = self.view.fleet
        target = DrainTarget(
            host=host,
            motoko_url=self.api.url,
            token=self.view.tokens[host],
            api_base=api_base,
            served_name=served,
            policy=fleet.drain,
            deadline_s=fleet.drain.deadline(fleet.routing),
        )
        client = HttpxDrains()
        self._clients.append(client)
        return FleetDrain(target, client, hooks=DrainHooks(say=say))

    def out_since(self, name: str, since: float) -> float | None:
        """Seconds from ``since`` until a reload that took ``name`` out was served."""
        for r in self.reloads:
            if r.at >= since and name in r.out and r.ok:
                return r.at + r.served_after_s - since
        return None

    def in_since(self, name: str, since: float) -> float | None:
        for r in self.reloads:
            if r.at >= since and name not in r.out and r.ok:
                return r.at + r.served_after_s - since
        return None


@dataclass
class Outcome:
    at: float  # monotonic, when sent
    seconds: float
    status: int | None
    by: str  # who answered (the fake's name in the content), or the error
    stream: bool = False
    #: the first try met a keep-alive connection the proxy closed (a reload's old worker) before
    #: any answer, and was sent again, as the OpenAI SDK does (``max_retries``, with backoff)
    resent: bool = False


@dataclass
class Load:
    """Requests at ``rate`` per second to ``model`` until stopped; every outcome recorded."""

    port: int
    token: str
    model: str = "local/chat"
    rate: float = 10.0
    stream: bool = False
    timeout_s: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=256)  # hung requests hold a thread each
        self._client = httpx.Client(timeout=self.timeout_s, limits=httpx.Limits(max_connections=256))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self, drain_s: float = 150.0) -> list[Outcome]:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self._client.close()
        return sorted(self.outcomes, key=lambda o: o.at)

    def _run(self) -> None:
        period, nxt = 1.0 / self.rate, time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self.one)
            nxt += period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def one(self) -> None:
        t0 = time.monotonic()
        status, by = self._try()
        resent = False
        # As the OpenAI SDK does (max_retries 2, backoff from 0.5 s): a request that met a
        # pooled connection the proxy had closed, before any answer, is sent again; by then the
        # pool has seen the other closed connections too.
        for delay in (0.5, 1.0):
            if status is not None or not _closed_before_answer(by):
                break
            resent = True
            time.sleep(delay)
            status, by = self._try()
        with self._lock:
            self.outcomes.append(Outcome(t0, time.monotonic() - t0, status, by, self.stream, resent))

    def _try(self) -> tuple[int | None, str]:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8,
            "stream": self.stream,
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        try:
            if self.stream:
                with self._client.stream("POST", url, json=body, headers=headers) as r:
                    text = "".join(r.iter_text())
                    status = r.status_code
                ok = status == 200 and "[DONE]" in text and "fake" in text
                by = _who(text) if ok else f"{status}: {text[:160]}"
            else:
                r = self._client.post(url, json=body, headers=headers)
                status, text = r.status_code, r.text
                by = _who(text) if status == 200 else f"{status}: {text[:160]}"
        except httpx.HTTPError as exc:
            status, by = None, f"{type(exc).__name__}: {exc}"[:160]
        return status, by


def _closed_before_answer(error: str) -> bool:
    """A pooled connection closed by the server as the request went out: nothing was answered."""
    return error.startswith(("ReadError", "RemoteProtocolError: Server disconnected", "WriteError"))


def _who(text: str) -> str:
    for name in ("armitage", "wintermute", "openai", "embed"):
        if f"@{name}" in text or f"name={name}" in text:
            return name
    return "unknown"


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200 or o.by in ("unknown",) or ":" in o.by]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def window(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    return [o for o in outcomes if start <= o.at < end]


def wait_until(check: Callable[[], object], deadline_s: float, step: float = 0.1) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step)
    return False


def stream_chat(port: int, token: str, max_tokens: int, out: dict[str, Any]) -> None:
    """One streamed ``local/chat`` completion through the proxy on ``port``; ``out`` gets its
    status, the text, how it finished, or the client's error."""
    body = {"model": "local/chat", "messages": [{"role": "user", "content": "a long answer"}]}
    text, finish = "", None
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(30.0)) as http,
            http.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={**body, "max_tokens": max_tokens, "stream": True},
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    text += (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["text"], out["finish"] = text, finish
