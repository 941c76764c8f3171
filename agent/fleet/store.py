"""The fleet's state on the motoko agent: the last accepted report of every host and the drain
leases held, in SQLite.

One file in the agent's state dir (``fleet.sqlite``, mode 0600), WAL journal: a restart of the
motoko agent loses nothing it had accepted. Checking a report against the last one and storing
it happen under one lock, in one transaction, so two reports of one host racing each other
cannot both pass the replay rule. A rejected report writes nothing. The same goes for drain
leases: judging a request against the leases held and writing the grant is one transaction,
so two hosts asking at once cannot both be granted, and a host holds at most one lease (its
name is the key), across restarts of the motoko agent too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import ValidationError

from agent.core.drain import Lease
from agent.core.errors import AgentError, error_line
from agent.core.report import Accepted, LastSeen, NodeReport, Verdict, accept

log = structlog.get_logger("agent.fleet")

FILENAME = "fleet.sqlite"
SCHEMA_VERSION = 2  # 2: drain leases

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    host        TEXT PRIMARY KEY,
    report      TEXT NOT NULL,     -- the last accepted NodeReport, as JSON
    boot_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    sent_at     REAL NOT NULL,
    received_at REAL NOT NULL,
    accepted    INTEGER NOT NULL,  -- reports accepted from this host, all runs together
    boots       INTEGER NOT NULL   -- runs (boot ids) of its agent seen
);
CREATE TABLE IF NOT EXISTS leases (
    host        TEXT PRIMARY KEY,  -- one lease per host at most
    backends    TEXT NOT NULL,     -- JSON list of backend names taken out of routing
    granted_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,     -- renewed by the holder; past it the lease is void
    reason      TEXT NOT NULL
)
"""


class FleetStoreError(AgentError):
    """The fleet state file cannot be opened or is not ours."""


@dataclass(frozen=True)
class HostRecord:
    report: NodeReport
    received_at: float
    accepted: int
    boots: int


class FleetStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                path.touch(mode=0o600)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._setup()
        except (OSError, sqlite3.Error) as exc:
            raise FleetStoreError(f"fleet state {path}: {exc}") from None

    def _setup(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):  # 1: reports only; the leases table is added
            raise FleetStoreError(
                f"fleet state {self.path}: schema version {version}, this agent knows {SCHEMA_VERSION}"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last reports, never corrupt
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        os.chmod(self.path, 0o600)

    def submit(self, report: NodeReport, authenticated_host: str, now: float, window_s: float) -> Verdict:
        """Judge ``report`` against the host's last accepted one and, if accepted, store it."""
        with self._lock:
            row = self._db.execute(
                "SELECT boot_id, seq, sent_at FROM reports WHERE host = ?", (authenticated_host,)
            ).fetchone()
            last = LastSeen(boot_id=row[0], seq=row[1], sent_at=row[2]) if row else None
            verdict = accept(report, authenticated_host, now, last, window_s)
            if isinstance(verdict, Accepted):
                self._write(report, now, new_boot=verdict.new_boot)
            return verdict

    def _write(self, report: NodeReport, now: float, new_boot: bool) -> None:
        self._db.execute(
            """
            INSERT INTO reports (host, report, boot_id, seq, sent_at, received_at, accepted, boots)
            VALUES (?, ?, ?, ?, ?, ?, 1, 1)
            ON CONFLICT (host) DO UPDATE SET
                report = excluded.report, boot_id = excluded.boot_id, seq = excluded.seq,
                sent_at = excluded.sent_at, received_at = excluded.received_at,
                accepted = accepted + 1, boots = boots + ?
            """,
            (
                report.host,
                report.model_dump_json(),
                report.boot_id,
                report.seq,
                report.sent_at,
                now,
                1 if new_boot else 0,
            ),
        )

    def hosts(self) -> list[HostRecord]:
        """Every host that ever reported, by name."""
        with self._lock:
            rows = self._db.execute("SELECT report, received_at, accepted, boots FROM reports ORDER BY host").fetchall()
        records = []
        for report, received_at, accepted, boots in rows:
            try:
                parsed = NodeReport.model_validate_json(report)
            except ValidationError as exc:  # stored by an agent whose schema differs: skipped, not a 500
                log.warning("stored report unreadable", error=error_line(exc))
                continue
            records.append(HostRecord(parsed, received_at=received_at, accepted=accepted, boots=boots))
        return records

    def ages(self, now: float) -> dict[str, float]:
        """Seconds since each host's last accepted report (cheap: no report is parsed)."""
        with self._lock:
            rows = self._db.execute("SELECT host, received_at, accepted FROM reports ORDER BY host").fetchall()
        return {host: max(0.0, now - received) for host, received, _ in rows}

    def accepted_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT host, accepted FROM reports ORDER BY host").fetchall())

    # ------------------------------------------------------------------ drain leases

    def acquire(
        self,
        host: str,
        backends: Set[str],
        reason: str,
        now: float,
        ttl_s: float,
        refusal: Callable[[list[Lease]], str | None],
    ) -> Lease | str:
        """Renew ``host``'s active lease, or grant a new one unless ``refusal(leases held)``
        says why not (that reason is returned instead). One transaction."""
        with self._lock:
            held = self._leases()
            mine = next((lease for lease in held if lease.host == host and lease.active(now)), None)
            if mine is None:
                why = refusal(held)
                if why is not None:
                    return why
                mine = Lease(host, frozenset(backends), now, now + ttl_s, reason)
            else:  # renewed: the backends drained stay those granted
                mine = Lease(host, mine.backends, mine.granted_at, now + ttl_s, mine.reason)
            self._db.execute(
                """
                INSERT INTO leases (host, backends, granted_at, expires_at, reason) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (host) DO UPDATE SET backends = excluded.backends, granted_at = excluded.granted_at,
                    expires_at = excluded.expires_at, reason = excluded.reason
                """,
                (host, json.dumps(sorted(mine.backends)), mine.granted_at, mine.expires_at, mine.reason),
            )
            return mine

    def release(self, host: str) -> bool:
        """Drop ``host``'s lease; False when it held none."""
        with self._lock:
            return self._db.execute("DELETE FROM leases WHERE host = ?", (host,)).rowcount > 0

    def leases(self) -> list[Lease]:
        """Every lease on file, expired ones included (``Lease.active`` tells)."""
        with self._lock:
            return self._leases()

    def _leases(self) -> list[Lease]:
        rows = self._db.execute(
            "SELECT host, backends, granted_at, expires_at, reason FROM leases ORDER BY host"
        ).fetchall()
        out = []
        for host, backends, granted, expires, reason in rows:
            try:
                names = frozenset(str(b) for b in json.loads(backends))
            except (ValueError, TypeError):
                names = frozenset()
            out.append(Lease(host, names, granted, expires, reason))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
