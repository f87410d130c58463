"""The deadline of a /metrics connection over TLS (`fleetd.metrics._Deadline`): it shuts the
connection's socket down when it fires, and never once the connection has ended (its socket
about to be closed, and its descriptor then free for another connection)."""

from __future__ import annotations

import socket

import pytest

import fleetd.metrics
from fleetd.metrics import _Deadline


@pytest.fixture(autouse=True)
def _no_timer_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetd.metrics, "TLS_CONNECTION_DEADLINE_S", 3600.0)


def test_a_deadline_that_fires_shuts_the_connection_down() -> None:
    ours, client = socket.socketpair()
    with ours, client:
        deadline = _Deadline(ours, "client")
        deadline._cut()  # (what its timer calls)
        ours.settimeout(5)
        assert ours.recv(1) == b""  # (the reading thread sees the end of the stream)
        deadline.end()


def test_a_deadline_ended_first_never_shuts_anything_down() -> None:
    ours, client = socket.socketpair()
    with ours, client:
        deadline = _Deadline(ours, "client")
        deadline.end()
        deadline._cut()  # (a timer that fired as the connection ended)
        client.sendall(b"x")
        ours.settimeout(5)
        assert ours.recv(1) == b"x"
