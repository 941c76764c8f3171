"""Drain before disruption, on a gpu_node: the steps around replacing the host's vLLM.

``FleetDrain(target, ...)(service, reason)`` is a context manager the executor wraps around
every action that stops its backend (a recreate, a restart, a removal):

on entry
  1. ask motoko for a drain lease (``POST /v1/drains``), again every ``ASK_EVERY_S`` while it
     answers "wait" (another member of a fallback chain is out), saying why every so often;
     past ``drain.lease_wait_s`` the pass fails (``DrainNotGranted``) and nothing is changed;
     motoko unreachable (or refusing this host's token) for ``drain.unreachable_s``: go on
     without a drain, and say so;
  2. once granted, renew the lease every quarter of its TTL on a thread until it is given back;
     wait until motoko says the proxy serves without this backend (at most ``ROUTE_OUT_S``);
  3. report the stage ``draining``; wait until vLLM has no request running or waiting (its own
     ``/metrics``) or ``drain.deadline_s`` has passed;

on exit (whatever the replacement did: the new version, or the old one rolled back)
  4. wait until the backend really serves: ``/health``, the expected model name in
     ``/v1/models``, a canary completion (at most ``READY_S``);
  5. report ready at once, then give the lease back (``DELETE /v1/drains``): motoko puts the
     backend back after good probes of its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from agent.adapters.fleetclient import DrainAnswer
from agent.adapters.vllm import DOWN, probe_backend, read_load
from agent.core.health import BackendHealth, Load
from agent.core.model import DrainPolicy
from agent.core.ports import Clock, SystemClock

log = structlog.get_logger("agent.drain")

#: Seconds between two asks while motoko says "wait", or while it cannot be reached.
ASK_EVERY_S = 2.0
#: Seconds between two "still waiting" lines.
SAY_EVERY_S = 30.0
#: Longest wait for the proxy to serve without this backend once the lease is granted.
ROUTE_OUT_S = 30.0
#: Seconds between two reads of vLLM's gauges while draining.
IDLE_POLL_S = 0.5
#: Longest wait, after the replacement, for the backend to answer its canary.
READY_S = 120.0


class DrainNotGranted(Exception):
    """No lease within ``lease_wait_s``: nothing was replaced."""


class DrainAborted(Exception):
    """The agent is stopping while waiting for a lease: nothing was replaced."""


class DrainApi(Protocol):
    def ask(self, url: str, token: str, reason: str) -> DrainAnswer: ...
    def release(self, url: str, token: str) -> DrainAnswer: ...


@dataclass(frozen=True)
class DrainTarget:
    """This host's backend, and where and how to ask for its drain (from the commit applied)."""

    host: str
    motoko_url: str | None
    token: str | None = field(repr=False)
    api_base: str  # the local vLLM: http://127.0.0.1:<published_port>/v1
    served_name: str
    policy: DrainPolicy
    deadline_s: float


@dataclass
class DrainState:
    """What the node says about its drain (``agent status``, logs)."""

    stage: str = "idle"  # idle | asking | waiting | draining | replacing | restoring
    detail: str = ""
    since: float = 0.0


class LocalBackend(Protocol):
    """This host's vLLM, as the drain sees it."""

    def load(self, api_base: str) -> Load | str: ...
    def probe(self, api_base: str, served_name: str) -> BackendHealth: ...


class HttpBackend:
    def load(self, api_base: str) -> Load | str:
        return read_load(api_base)

    def probe(self, api_base: str, served_name: str) -> BackendHealth:
        return probe_backend(api_base, served_name, timeout_s=5.0)


@dataclass(frozen=True)
class DrainHooks:
    say: Callable[[str], None] = lambda message: None
    #: the agent is shutting down: stop waiting
    stopping: Callable[[], bool] = lambda: False
    #: draining (True) or done (False): the node reports its stage at once
    on_stage: Callable[[bool], None] = lambda draining: None


class FleetDrain:
    def __init__(
        self,
        target: DrainTarget,
        api: DrainApi,
        backend: LocalBackend | None = None,
        hooks: DrainHooks | None = None,
        clock: Clock | None = None,
        state: DrainState | None = None,
    ) -> None:
        hooks = hooks or DrainHooks()
        self.target = target
        self.api = api
        self.backend = backend or HttpBackend()
        self.say = hooks.say
        self.stopping = hooks.stopping
        self.on_stage = hooks.on_stage
        self.clock = clock or SystemClock()
        self.state = state or DrainState()
        self._done = threading.Event()  # set: stop renewing the lease

    # ------------------------------------------------------------------ the executor's side

    @contextlib.contextmanager
    def __call__(self, service: str, reason: str, comes_back: bool = True) -> Iterator[None]:
        """Drain ``service`` around the block; ``comes_back`` False: it is being removed (the
        lease is given back without waiting for it to serve again)."""
        t = self.target
        if not t.policy.enabled:
            yield
            return
        if not t.motoko_url or not t.token:
            self.say(f"{service}: not drained first: no motoko to ask (this host has no report_token)")
            yield
            return
        granted = self._lease(service, reason)
        renewer = self._start_renewing() if granted else None
        try:
            if granted:
                self._wait_routed_out(service)
            self.on_stage(True)
            self._wait_idle(service)
            self._set("replacing", reason)
            yield
        finally:
            if comes_back:
                self._set("restoring", "waiting for the backend to answer its canary")
                self._wait_ready(service)
            self.on_stage(False)
            if renewer is not None:
                self._done.set()
                renewer.join(5.0)
            # Given back even when motoko was not reached: asks it had queued (a frozen motoko
            # agent answers them when it wakes) may have granted a lease nobody holds.
            self._give_back(service, granted)
            self._set("idle", "")

    # ------------------------------------------------------------------ steps

    def _lease(self, service: str, reason: str) -> bool:
        """True once granted; False to go on without a lease (motoko unreachable)."""
        t = self.target
        assert t.motoko_url and t.token
        start = self.clock.monotonic()
        unreachable_since: float | None = None
        next_say = start
        self._set("asking", f"asking motoko for a drain of {service}")
        while True:
            answer = self.api.ask(t.motoko_url, t.token, f"{service}: {reason}")
            now = self.clock.monotonic()
            if answer.granted:
                self.say(f"{service}: drain lease granted by motoko")
                return True
            if answer.waiting:
                unreachable_since = None
                why = answer.detail.removeprefix("HTTP 409: ")
                self._set("waiting", f"waiting for a drain lease: {why}")
                if now - start >= t.policy.lease_wait_s:
                    raise DrainNotGranted(
                        f"{service}: no drain lease within {t.policy.lease_wait_s:.0f}s ({why}); "
                        "nothing was replaced; a later pass asks again"
                    )
            else:  # not reached, or refused (a token motoko does not know yet, a 5xx)
                unreachable_since = now if unreachable_since is None else unreachable_since
                self._set("asking", f"motoko: {answer.detail or answer.status}")
                if now - unreachable_since >= t.policy.unreachable_s:
                    self.say(
                        f"{service}: motoko did not grant a drain for {t.policy.unreachable_s:.0f}s "
                        f"({answer.detail or answer.status}); going on WITHOUT a drain"
                    )
                    log.warning("drain skipped: motoko unreachable", service=service, detail=answer.detail)
                    return False
            if now >= next_say:
                self.say(f"{service}: {self.state.detail}")
                next_say = now + SAY_EVERY_S
            if self.stopping():
                raise DrainAborted(f"{service}: the agent is stopping while waiting for a drain lease")
            self.clock.sleep(ASK_EVERY_S)

    def _give_back(self, service: str, granted: bool) -> None:
        """Give the lease back; motoko unreachable (restarting): try again on a thread until the
        lease would have expired anyway, so the backend is not held out of routing for nothing."""
        t = self.target
        assert t.motoko_url and t.token
        answer = self.api.release(t.motoko_url, t.token)
        if answer.status == 200:
            return
        if granted:
            self.say(f"{service}: drain lease not given back yet ({answer.detail or answer.status}); trying again")
        url, token, until = t.motoko_url, t.token, time.monotonic() + t.policy.lease_ttl_s

        def again() -> None:
            while time.monotonic() < until:
                if self.api.release(url, token).status == 200:
                    log.info("drain lease given back", service=service)
                    return
                time.sleep(ASK_EVERY_S)
            log.warning("drain lease not given back; it has expired by now", service=service)

        threading.Thread(target=again, name="drain-release", daemon=True).start()

    def _start_renewing(self) -> threading.Thread:
        self._done.clear()
        every = max(1.0, self.target.policy.lease_ttl_s / 4)
        thread = threading.Thread(target=self._renew, args=(every,), name="drain-lease", daemon=True)
        thread.start()
        return thread

    def _renew(self, every: float) -> None:
        t = self.target
        assert t.motoko_url and t.token
        # Real time, not the injected clock: this thread keeps the lease alive in the world's time.
        while not self._done.wait(every):
            answer = self.api.ask(t.motoko_url, t.token, "renew")
            if not answer.granted:
                log.warning("drain lease not renewed", detail=answer.detail or answer.status)

    def _wait_routed_out(self, service: str) -> None:
        t = self.target
        assert t.motoko_url and t.token
        end = self.clock.monotonic() + ROUTE_OUT_S
        self._set("draining", "waiting for the gateway to route around this backend")
        while True:
            answer = self.api.ask(t.motoko_url, t.token, "routed out?")
            if answer.granted and answer.body.get("routed_out") is True:
                self.say(f"{service}: out of the gateway's routing")
                return
            if self.clock.monotonic() >= end or self.stopping():
                self.say(
                    f"{service}: the gateway did not confirm it routes around it in {ROUTE_OUT_S:.0f}s; draining anyway"
                )
                return
            self.clock.sleep(1.0)

    def _wait_idle(self, service: str) -> None:
        deadline = self.target.deadline_s
        start = self.clock.monotonic()
        next_say = start + SAY_EVERY_S
        while True:
            load = self.backend.load(self.target.api_base)
            if load == DOWN:
                self.say(f"{service}: its vLLM is not listening: nothing in flight to wait for")
                return
            if isinstance(load, Load) and load.idle:
                self.say(f"{service}: drained in {self.clock.monotonic() - start:.1f}s")
                return
            # Busy, or its gauges unreadable (a timeout: a loaded server): keep waiting.
            now_load = (
                f"{load.running:g} running, {load.waiting:g} waiting"
                if isinstance(load, Load)
                else f"gauges unreadable ({load})"
            )
            now = self.clock.monotonic()
            self._set("draining", now_load)
            if now - start >= deadline or self.stopping():
                self.say(f"{service}: drain deadline ({deadline:.0f}s) passed with {now_load}; replacing anyway")
                return
            if now >= next_say:
                self.say(f"{service}: draining: {now_load}")
                next_say = now + SAY_EVERY_S
            self.clock.sleep(IDLE_POLL_S)

    def _wait_ready(self, service: str) -> None:
        t = self.target
        end = self.clock.monotonic() + READY_S
        while True:
            health = self.backend.probe(t.api_base, t.served_name)
            if health.ready:
                return
            if self.clock.monotonic() >= end or self.stopping():
                self.say(f"{service}: not serving after {READY_S:.0f}s ({health.reason}); giving the drain back anyway")
                return
            self.clock.sleep(1.0)

    def _set(self, stage: str, detail: str) -> None:
        if stage != self.state.stage:
            self.state.since = self.clock.time()
        self.state.stage, self.state.detail = stage, detail
