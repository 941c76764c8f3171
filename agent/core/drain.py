"""Drain leases, pure: may this host take its backend out of routing now?

Before a gpu_node agent stops or replaces its vLLM it asks motoko for a *lease*. Motoko grants
it only when the fleet keeps its capacity floor: in every fallback chain that holds one of the
host's backends, at most ``drain.max_out_per_chain`` local backends may be unavailable at once,
counting those drained by other leases and those out of routing for any other reason (dead,
hung, not yet back from their own deploy). So with the default of 1, armitage and wintermute
(both in ``local/chat``'s chain) are never out together, and the second host of a push that
changes both waits until the first is back in routing.

A lease names its host and backends, and expires ``lease_ttl_s`` after it was last renewed
(a node that dies while draining does not hold the fleet). A host holds at most one lease;
asking again renews it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from agent.core.model import RoutingPolicy
from agent.core.routing import Backend, chain


@dataclass(frozen=True, slots=True)
class Lease:
    host: str
    backends: frozenset[str]
    granted_at: float
    expires_at: float
    reason: str = ""

    def active(self, now: float) -> bool:
        return now < self.expires_at

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "host": self.host,
            "backends": sorted(self.backends),
            "granted_at": self.granted_at,
            "expires_at": self.expires_at,
            "expires_in_s": round(max(0.0, self.expires_at - now), 1),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Group:
    """The local backends of one alias's fallback chain (the capacity floor counts them)."""

    alias: str
    members: frozenset[str]


def groups(policy: RoutingPolicy, table: Iterable[Backend]) -> list[Group]:
    """One group per alias whose chain holds two or more local backends, by alias."""
    native = {b.alias: b for b in table}
    out = []
    for alias in sorted(native):
        members = frozenset(native[a].name for a in chain(policy, alias) if a in native and native[a].kind == "vllm")
        if len(members) > 1:
            out.append(Group(alias, members))
    # Aliases whose chains hold the same members are one group (said once).
    unique: dict[frozenset[str], Group] = {}
    for g in out:
        unique.setdefault(g.members, g)
    return list(unique.values())


def host_backends(host: str, table: Iterable[Backend]) -> frozenset[str]:
    return frozenset(b.name for b in table if b.host == host and b.kind == "vllm")


def refusal(
    host: str,
    mine: Set[str],
    leases: Iterable[Lease],
    out: Mapping[str, str],
    fleet_groups: Iterable[Group],
    now: float,
    max_out: int = 1,
) -> str | None:
    """Why ``host`` may not drain its backends ``mine`` now; ``None``: grant it.

    ``leases``: every lease held (expired ones are ignored); ``out``: backend -> why, for every
    backend out of routing now (this host's own backends are ignored: draining them changes
    nothing for them)."""
    held: dict[str, str] = {}  # backend -> the other host holding a lease on it
    for lease in leases:
        if lease.host != host and lease.active(now):
            for b in lease.backends:
                held[b] = lease.host
    for group in fleet_groups:
        if not group.members & mine:
            continue
        others = sorted(group.members - mine)
        unavailable = [b for b in others if b in held or b in out]
        if len(unavailable) + 1 > max_out:
            why = ", ".join(
                f"{b} is drained by {held[b]}" if b in held else f"{b} is out of routing ({out[b]})"
                for b in unavailable
            )
            return f"{why}: {group.alias}'s chain may have only {max_out} backend(s) out at a time"
    return None
