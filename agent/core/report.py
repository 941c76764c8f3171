"""What a host's agent reports to the motoko agent, and whether motoko takes it: pure.

A report is strict (no coercion, no unknown field). ``accept`` decides from the report, the
host its bearer token belongs to, the clock and what was last accepted from that host:

- a host may report only for itself;
- ``sent_at`` must be within ``window_s`` of motoko's clock (a captured report cannot be
  replayed later, and a host with a wrong clock is told so);
- within one run of an agent (one ``boot_id``, a random id drawn at its start) ``seq`` must
  grow: a report replayed inside the window is refused;
- an agent that restarts draws a new ``boot_id`` and starts ``seq`` over; a new ``boot_id``
  is taken only with a ``sent_at`` later than the last accepted report's, so a report of an
  earlier run, replayed after the restart, is refused too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from agent.core.gpu import GpuFacts
from agent.core.health import BackendHealth, Stage

DEFAULT_WINDOW_S = 60.0
#: The longest ``problem`` a report carries (a longer one is cut by the host).
MAX_PROBLEM = 500
HOST_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class NodeReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    host: str = Field(pattern=HOST_PATTERN)
    role: str = Field(min_length=1, max_length=64)
    #: The desired-state commit applied on the host (``None``: nothing applied yet).
    commit: str | None = Field(default=None, pattern=r"^[0-9a-f]{7,64}$")
    stage: Stage
    #: Backend probes and load (gpu_node hosts); ``None`` where the role has no backend.
    health: BackendHealth | None = None
    gpu: GpuFacts | None = None
    #: The host's last pass failed: on which commit, the failure and its error (redacted by the
    #: host). ``None`` once a pass converged. What running is kept is in ``commit``/``stage``.
    problem: str | None = Field(default=None, min_length=1, max_length=MAX_PROBLEM)
    #: Service name -> its state (``running``, ``exited``...), as the host observed them.
    services: dict[str, str] = Field(default_factory=dict, max_length=64)
    #: Drawn at random when the agent starts (hex, at least 64 bits).
    boot_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    #: Grows with every report of one run (one ``boot_id``).
    seq: int = Field(ge=0, lt=2**63)
    #: When the host sent it (epoch seconds, its own clock).
    sent_at: float = Field(allow_inf_nan=False, ge=0)
    agent_version: str = Field(min_length=1, max_length=64)


@dataclass(frozen=True)
class LastSeen:
    """What motoko last accepted from a host: the replay rule needs nothing more."""

    boot_id: str
    seq: int
    sent_at: float


class Rejection(StrEnum):
    WRONG_HOST = "wrong_host"
    STALE = "stale"
    FUTURE = "future"
    REPLAY = "replay"


@dataclass(frozen=True)
class Accepted:
    #: The agent restarted (a new ``boot_id``), or this is the host's first report.
    new_boot: bool


@dataclass(frozen=True)
class Rejected:
    reason: Rejection
    detail: str


Verdict = Accepted | Rejected


def accept(
    report: NodeReport,
    authenticated_host: str,
    now: float,
    last: LastSeen | None,
    window_s: float = DEFAULT_WINDOW_S,
) -> Verdict:
    """Take the report, or say why not (see the module's docstring for the rules)."""
    if report.host != authenticated_host:
        return Rejected(
            Rejection.WRONG_HOST,
            f"host {authenticated_host!r} may report only for itself, not for {report.host!r}",
        )
    return _in_window(report, now, window_s) or _in_order(report, last)


def _in_window(report: NodeReport, now: float, window_s: float) -> Rejected | None:
    skew = report.sent_at - now
    if math.isfinite(skew) and abs(skew) <= window_s:
        return None
    reason = Rejection.FUTURE if skew > 0 else Rejection.STALE
    return Rejected(reason, f"stale or from the future: sent_at is {skew:+.1f} s off (window ±{window_s:g} s)")


def _in_order(report: NodeReport, last: LastSeen | None) -> Verdict:
    if last is None:
        return Accepted(new_boot=True)
    if report.boot_id == last.boot_id:
        if report.seq <= last.seq:
            return Rejected(Rejection.REPLAY, f"replay: seq {report.seq} not after {last.seq} of this run")
        return Accepted(new_boot=False)
    if report.sent_at <= last.sent_at:
        return Rejected(Rejection.REPLAY, "replay: a report of another run, not newer than the last accepted")
    return Accepted(new_boot=True)
