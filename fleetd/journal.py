"""Durable reservations and queue: an embedded SQLite journal in WAL mode.

Every reservation the state owner grants, and every workload it queues, is written (and
committed) before the Place reply leaves the daemon, so after `kill -9` and a restart every
reservation that was neither released nor expired is reloaded and re-allocated before the
first new Place is answered (nothing is allocated twice), and every queued workload is back
in the queue in its old order. WAL with synchronous=NORMAL survives a process crash (the OS
keeps the written pages); FULL also survives power loss at the price of an fsync per commit.

The journal is only ever called from the state owner's serialized path; it is synchronous
on purpose (a commit without fsync takes tens of microseconds, cheaper than a thread hop).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA_VERSION = 2
#: Older schemas this code upgrades in place (2 added the queue table, created above).
_UPGRADABLE = {"1"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    workload_id   TEXT PRIMARY KEY,
    team          TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'confirmed')),
    created_at_s  REAL NOT NULL,
    expires_at_s  REAL NOT NULL,
    decision_seq  INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    pods          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    seq   INTEGER PRIMARY KEY,
    body  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    workload_id   TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL,
    since_s       REAL NOT NULL,
    request       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class ReservedPod:
    """One pod of a reservation: where it goes and what it holds there."""

    pod_name: str
    cluster: str
    node: str
    gpu_indices: tuple[int, ...]
    gpu_milli: int
    cpu_millicores: int
    memory_bytes: int
    pool: str = ""
    confirmed: bool = False
    #: The node's GPU model for a GPU pod ('' for a CPU-only pod, and in journals written
    #: before team quotas): what the team's per-model quota usage is charged to.
    gpu_model: str = ""


def pod_fields(pod: ReservedPod) -> dict[str, object]:
    """A reserved pod's fields by name, for JSON (what `dataclasses.asdict` gives, without its
    recursive deep copy: ~10x faster, and this runs for every pod of every Place)."""
    return {name: getattr(pod, name) for name in _POD_FIELDS}


_POD_FIELDS = tuple(f.name for f in fields(ReservedPod))


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted placement, held until released, confirmed and finished, or expired.

    `fingerprint` is a hash of the request: a repeated Place with the same workload id and
    the same request replays this decision; a different request with the same id is refused.
    """

    workload_id: str
    team: str
    priority: int
    state: str  # "pending" | "confirmed"
    created_at_s: float
    expires_at_s: float
    decision_seq: int
    fingerprint: str
    pods: tuple[ReservedPod, ...]


@dataclass(frozen=True, slots=True)
class QueuedWorkload:
    """A QUEUED workload: waits for capacity, retried in (priority, seq) order.

    `request` is the validated request as JSON (the state owner encodes and decodes it, so
    the journal knows nothing of its shape); `seq` is the decision that queued it.
    """

    workload_id: str
    seq: int
    since_s: float
    request: str


class JournalError(RuntimeError):
    """The journal file cannot be opened or has an unknown schema."""


class Journal:
    """The reservation table and a few counters in one SQLite file (WAL)."""

    def __init__(self, path: Path | str, synchronous: str = "NORMAL") -> None:
        """Open (creating if needed) the journal at `path`; ':memory:' for throwaway use."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.path = str(Path(self.path).expanduser())
        try:
            # isolation_level=None: explicit transactions below, one per mutation.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None or version in _UPGRADABLE:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif version != str(SCHEMA_VERSION):
                raise JournalError(
                    f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot open journal: {exc}") from exc

    def close(self) -> None:
        """Checkpoint and close; safe to call twice."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def get_meta(self, key: str) -> str | None:
        """A value of the meta table (None when absent)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the meta table (committed)."""
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    #: Decisions kept for WatchDecisions resume across restarts (set from the config).
    retain_decisions = 100_000

    def put(
        self, res: Reservation, last_seq: int, decision: str = "", dequeue: bool = False
    ) -> None:
        """Insert or replace a reservation with its decision (JSON), atomically; `dequeue`:
        the workload was queued until now (its queue entry goes in the same transaction)."""
        pods = json.dumps([pod_fields(p) for p in res.pods], separators=(",", ":"))
        with self._transaction():
            if dequeue:
                self._db.execute("DELETE FROM queue WHERE workload_id = ?", (res.workload_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    res.workload_id,
                    res.team,
                    res.priority,
                    res.state,
                    res.created_at_s,
                    res.expires_at_s,
                    res.decision_seq,
                    res.fingerprint,
                    pods,
                ),
            )
            self._set_seq(last_seq, decision)

    def delete(self, workload_id: str, last_seq: int, decision: str = "") -> None:
        """Forget a released, expired or finished reservation with its decision, atomically."""
        with self._transaction():
            self._db.execute("DELETE FROM reservations WHERE workload_id = ?", (workload_id,))
            self._set_seq(last_seq, decision)

    def enqueue(self, item: QueuedWorkload, decision: str = "") -> None:
        """Queue a workload with the decision that queued it (seq = item.seq), atomically."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO queue VALUES (?, ?, ?, ?)",
                (item.workload_id, item.seq, item.since_s, item.request),
            )
            self._set_seq(item.seq, decision)

    def dequeue(self, workload_id: str, last_seq: int, decision: str = "") -> None:
        """Drop a queued workload (released by its client) with its decision, atomically."""
        with self._transaction():
            self._db.execute("DELETE FROM queue WHERE workload_id = ?", (workload_id,))
            self._set_seq(last_seq, decision)

    def queued(self) -> list[QueuedWorkload]:
        """Every queued workload, in the order it was queued."""
        rows = self._db.execute("SELECT * FROM queue ORDER BY seq").fetchall()
        return [QueuedWorkload(str(r[0]), int(r[1]), float(r[2]), str(r[3])) for r in rows]

    def record_seq(self, last_seq: int, decision: str = "") -> None:
        """Record a decision that holds nothing (queued, unschedulable, ...)."""
        with self._transaction():
            self._set_seq(last_seq, decision)

    def decisions(self, limit: int) -> list[str]:
        """The last `limit` recorded decisions (JSON), oldest first."""
        rows = self._db.execute(
            "SELECT body FROM (SELECT seq, body FROM decisions ORDER BY seq DESC LIMIT ?) "
            "ORDER BY seq",
            (limit,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def last_seq(self) -> int:
        """The last decision sequence number handed out (0 on a new journal)."""
        value = self.get_meta("last_seq")
        return 0 if value is None else int(value)

    def reservations(self) -> Iterator[Reservation]:
        """Every stored reservation, oldest decision first."""
        rows = self._db.execute("SELECT * FROM reservations ORDER BY decision_seq").fetchall()
        for row in rows:
            pods = tuple(
                ReservedPod(**{**p, "gpu_indices": tuple(p["gpu_indices"])})
                for p in json.loads(row[8])
            )
            yield Reservation(
                workload_id=row[0],
                team=row[1],
                priority=int(row[2]),
                state=row[3],
                created_at_s=float(row[4]),
                expires_at_s=float(row[5]),
                decision_seq=int(row[6]),
                fingerprint=row[7],
                pods=pods,
            )

    def _set_seq(self, last_seq: int, decision: str = "") -> None:
        self.set_meta("last_seq", str(last_seq))
        if decision:
            self._db.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?)", (last_seq, decision))
            if last_seq % 1024 == 0:  # prune now and then, not on every write
                self._db.execute(
                    "DELETE FROM decisions WHERE seq <= ?", (last_seq - self.retain_decisions,)
                )

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _transaction(self) -> Journal._Tx:
        return Journal._Tx(self._db)
