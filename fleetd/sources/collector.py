"""Pauses of CPython's cyclic garbage collector while a poll of telemetry is decoded and
applied, counted across tasks.

A poll allocates a few acyclic objects per record (aiokafka's records, the decoded
updates); left on, the collector would run a young collection every few hundred records and
carry each poll's records through the older generations, finding nothing to free (measured
on the ingest benchmark: ~0.5 µs a record). Reference counting frees what a poll drops, and
the collector runs again between polls.

Two rules make the pauses safe to nest and to interleave:
- `paused()` is counted: the first pause turns the collector off, and the last one to end
  turns it back on if it was on before the first began, whichever task ends last.
- `running()` is for a wait on the network inside a pause (the dead-letter topic, the
  group's committed offsets, a worker's socket): a broker outage can make it last, and the
  daemon's other tasks go on allocating meanwhile. The collector runs while any such wait
  is in progress and is paused again when the last one ends, if a pause is still held.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_pauses = 0
_waits = 0
#: Whether the collector was on when the first of the current pauses began.
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off for the block (see the module docstring)."""
    global _pauses, _was_enabled
    if _pauses == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.enable()


@contextlib.contextmanager
def running() -> Iterator[None]:
    """The cyclic collector on for a network wait inside a pause (see the module docstring);
    outside any pause, nothing changes."""
    global _waits
    _waits += 1
    if _waits == 1 and _pauses and _was_enabled:
        gc.enable()
    try:
        yield
    finally:
        _waits -= 1
        if _waits == 0 and _pauses:
            gc.disable()
