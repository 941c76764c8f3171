"""The drain desk of the motoko agent's fleet API: leases asked, renewed, released.

``POST /v1/drains`` (the host's own report token; body ``{"reason": "..."}``, optional): grants
a lease on the host's backends, or renews the one it holds, when the capacity floor allows
(``agent.core.drain.refusal``); else 409 with the reason (the node asks again). A granted
answer says whether the proxy already serves without those backends (``routed_out``): the node
waits for that before it waits for its in-flight requests. ``DELETE /v1/drains``: the host
gives its lease back (its backend comes back in routing through good probes and a fresh ready
report, never at once). ``GET /v1/drains``: the rollout: leases held and hosts waiting.

The leases live in the fleet store (SQLite): a restarted motoko agent keeps them, and the
routing loop takes every leased backend out of routing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.core.drain import Group, Lease, groups, host_backends, refusal
from agent.core.model import DrainPolicy, Fleet
from agent.core.routing import Backend
from agent.fleet.store import FleetStore

log = structlog.get_logger("agent.fleet")

#: The longest ``reason`` kept from a drain request.
MAX_REASON = 200
#: A host that stopped asking this long ago is no longer listed as waiting.
WAITING_FORGOTTEN_S = 60.0


class DrainRefused(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DrainContext:
    """What the desk needs from the commit last applied."""

    policy: DrainPolicy
    table: list[Backend]
    groups: list[Group]

    @classmethod
    def of(cls, fleet: Fleet, table: list[Backend]) -> DrainContext:
        return cls(fleet.drain, table, groups(fleet.routing, table))


@dataclass
class Waiting:
    since: float
    asked: float
    why: str


@dataclass
class DrainDesk:
    store: FleetStore
    clock: Callable[[], float] = time.time
    context: DrainContext | None = None
    #: backend -> why, for each backend out of routing now (the routing loop's view)
    out_of_routing: Callable[[], Mapping[str, str]] = dict
    #: True once the proxy serves a config without every one of these backends
    routed_out: Callable[[frozenset[str]], bool] = lambda backends: False
    waiting: dict[str, Waiting] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, host: str, raw: bytes) -> dict[str, Any]:
        reason = _reason(raw)
        ctx = self.context
        if ctx is None:
            raise DrainRefused("motoko has not loaded the fleet's settings yet; ask again", 503)
        now = self.clock()
        mine = host_backends(host, ctx.table)
        out = {b: why for b, why in self.out_of_routing().items() if b not in mine}

        def judge(held: list[Lease]) -> str | None:
            return refusal(host, mine, held, out, ctx.groups, now, ctx.policy.max_out_per_chain)

        got = self.store.acquire(host, mine, reason, now, ctx.policy.lease_ttl_s, judge)
        with self._lock:
            if isinstance(got, str):
                first = host not in self.waiting
                w = self.waiting.setdefault(host, Waiting(now, now, got))
                w.asked, w.why = now, got
                if first:
                    log.info("drain waits", host=host, why=got)
                raise DrainRefused(got, 409)
            self.waiting.pop(host, None)
        if got.granted_at == now:
            log.info("drain lease granted", host=host, backends=sorted(got.backends), reason=got.reason)
        return {
            "granted": True,
            **got.as_dict(now),
            "ttl_s": ctx.policy.lease_ttl_s,
            "routed_out": not got.backends or self.routed_out(got.backends),
        }

    def release(self, host: str) -> dict[str, Any]:
        released = self.store.release(host)
        with self._lock:
            self.waiting.pop(host, None)
        if released:
            log.info("drain lease released", host=host)
        return {"released": released, "host": host}

    def drained_backends(self) -> frozenset[str]:
        """Every backend under an active lease (the routing loop takes them out)."""
        now = self.clock()
        return frozenset(b for lease in self.store.leases() if lease.active(now) for b in lease.backends)

    def view(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            for host in [h for h, w in self.waiting.items() if now - w.asked > WAITING_FORGOTTEN_S]:
                del self.waiting[host]
            waiting = [
                {"host": h, "waiting_s": round(now - w.since, 1), "why": w.why} for h, w in sorted(self.waiting.items())
            ]
        leases = []
        for lease in self.store.leases():
            item = lease.as_dict(now)
            item["state"] = (
                "expired" if not lease.active(now) else "routed out" if self.routed_out(lease.backends) else "draining"
            )
            leases.append(item)
        return {"leases": leases, "waiting": waiting}


def _reason(raw: bytes) -> str:
    if not raw.strip():
        return ""
    try:
        body = json.loads(raw)
    except ValueError:
        raise DrainRefused("body is not JSON", 400) from None
    if not isinstance(body, dict):
        raise DrainRefused("body must be a JSON object", 400)
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise DrainRefused(f"unknown field(s): {', '.join(unknown)}", 400)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise DrainRefused("reason: must be a string", 400)
    return " ".join(reason.split())[:MAX_REASON]
