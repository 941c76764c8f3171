"""The fleet's state on the motoko agent: the last accepted report of every host, in SQLite.

One file in the agent's state dir (``fleet.sqlite``, mode 0600), WAL journal: a restart of the
motoko agent loses nothing it had accepted. Checking a report against the last one and storing
it happen under one lock, in one transaction, so two reports of one host racing each other
cannot both pass the replay rule. A rejected report writes nothing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import ValidationError

from agent.core.errors import AgentError, error_line
from agent.core.report import Accepted, LastSeen, NodeReport, Verdict, accept

log = structlog.get_logger("agent.fleet")

FILENAME = "fleet.sqlite"
SCHEMA_VERSION = 1

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
        if version not in (0, SCHEMA_VERSION):
            raise FleetStoreError(
                f"fleet state {self.path}: schema version {version}, this agent knows {SCHEMA_VERSION}"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last reports, never corrupt
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
