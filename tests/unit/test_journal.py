"""The SQLite journal: round trip, durability without close, schema guard."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from fleetd.journal import Journal, JournalError, QueuedWorkload, Reservation, ReservedPod
from fleetd.state import Decision, Explanation, decode_decision, encode_decision


def reservation(wid: str, seq: int) -> Reservation:
    pod = ReservedPod("p0", "c1", "n1", (0, 3), 1000, 4000, 2**34, pool="a100")
    return Reservation(wid, "ml", 5, "pending", 10.0, 310.0, seq, "fp", (pod,))


def test_round_trip_survives_unclosed_connection(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path)
    j.put(reservation("a", 1), last_seq=1)
    j.put(reservation("b", 2), last_seq=2)
    j.delete("a", last_seq=3)
    # No close(): a second connection (a restarted process) sees every commit.
    again = Journal(path)
    assert [r.workload_id for r in again.reservations()] == ["b"]
    assert list(again.reservations()) == [reservation("b", 2)]
    assert again.last_seq() == 3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    Journal(path).set_meta("schema_version", "99")
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(path)


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(JournalError, match="cannot open journal"):
        Journal(tmp_path / "dir.sqlite3")


def test_decisions_are_kept_for_resume(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    j.retain_decisions = 3
    for seq in range(1, 1030):
        j.record_seq(seq, f'{{"seq": {seq}}}')
    again = Journal(tmp_path / "j.sqlite3")
    assert again.decisions(2) == ['{"seq": 1028}', '{"seq": 1029}']
    # Pruned now and then (every 1024 seqs) down to the retained window.
    assert len(again.decisions(10_000)) == 1029 - 1024 + 3


def test_queue_round_trip_and_dequeue_with_the_grant(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path)
    j.enqueue(QueuedWorkload("q2", 2, 11.0, '{"b": 1}'), '{"seq": 2}')
    j.enqueue(QueuedWorkload("q1", 1, 10.0, '{"a": 1}'), '{"seq": 1}')
    j.enqueue(QueuedWorkload("q3", 3, 12.0, "{}"))
    j.dequeue("q3", last_seq=4)
    j.put(reservation("q2", 5), last_seq=5, dequeue=True)
    again = Journal(path)
    assert again.queued() == [QueuedWorkload("q1", 1, 10.0, '{"a": 1}')]
    assert [r.workload_id for r in again.reservations()] == ["q2"]
    assert again.last_seq() == 5


def test_version_1_journal_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
    )
    db.commit()
    db.close()
    j = Journal(path)
    assert j.get_meta("schema_version") == "2"
    assert j.queued() == []


def test_decisions_encode_as_asdict_did_and_decode_back() -> None:
    """The field-by-field encoding writes the JSON `dataclasses.asdict` wrote (journals of
    earlier versions decode alike), and decodes to the same decision."""
    pod = ReservedPod("w-0", "c1", "n1", (0, 3), 1000, 2000, 8 << 30, pool="p1")
    expl = Explanation(10, 0, (("INSUFFICIENT_GPU", 10, "Insufficient nvidia.com/gpu"),), "0/10")
    for d in (
        Decision(7, 1.5, "place", "w", "ml", "placed", (pod,), None, "pending", 9.5),
        Decision(8, 2.0, "place", "q", "ml", "queued", (), expl),
    ):
        assert encode_decision(d) == json.dumps(dataclasses.asdict(d), separators=(",", ":"))
        assert decode_decision(encode_decision(d)) == d
