"""What every telemetry source shares: the sink it feeds and reconnect backoff."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from fleetd.sources.updates import Update


class UpdateSink(Protocol):
    """The state owner as a source sees it: applies a batch of updates, in order.

    A source awaits `apply` before it acknowledges what the batch came from (a Kafka
    offset commit), so an update is never acknowledged before it is applied.
    """

    async def apply(self, updates: Sequence[Update]) -> None:
        """Apply `updates` in order."""
        ...


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
    And Jitter"): reconnecting clients do not retry in lockstep."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 30.0, *, seed: int | None = None):
        self.initial_s = initial_s
        self.max_s = max_s
        self._attempt = 0
        self._rng = random.Random(seed)

    def next_delay_s(self) -> float:
        """The delay before the next attempt; grows until `reset`."""
        ceiling = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Call after a success: the next failure waits `initial_s` again."""
        self._attempt = 0
