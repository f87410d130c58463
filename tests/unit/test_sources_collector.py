"""`fleetd.sources.collector`: pauses of the cyclic collector, counted across tasks, and the
network waits inside them that let it run."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import AbstractContextManager

import pytest

from fleetd.sources import collector


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


def _enter(cm: AbstractContextManager[None]) -> AbstractContextManager[None]:
    cm.__enter__()
    return cm


def _leave(cm: AbstractContextManager[None]) -> None:
    cm.__exit__(None, None, None)


def test_a_pause_turns_it_off_and_back_on() -> None:
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # (a poll's apply inside the poll)
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_last_pause_to_end_turns_it_back_on_whichever_task_ends_last() -> None:
    # Two sources' polls interleaved: A pauses, B pauses, B waits on the broker (on), A ends,
    # B's wait ends, B ends. (Before the count, B's wait turned it off after A had turned it
    # on, and B, which found it off, left it off for good.)
    a = _enter(collector.paused())
    b = _enter(collector.paused())
    b_wait = _enter(collector.running())
    assert gc.isenabled()
    _leave(a)
    assert gc.isenabled()
    _leave(b_wait)
    assert not gc.isenabled()  # (B's poll still holds its pause)
    _leave(b)
    assert gc.isenabled()


def test_it_runs_while_any_wait_is_in_progress() -> None:
    with collector.paused():
        first = _enter(collector.running())
        second = _enter(collector.running())
        _leave(first)
        assert gc.isenabled()  # (the second wait, e.g. a broker outage, goes on)
        _leave(second)
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with collector.paused(), collector.running():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_a_wait_outside_any_pause_changes_nothing() -> None:
    with collector.running():
        assert gc.isenabled()
    assert gc.isenabled()
