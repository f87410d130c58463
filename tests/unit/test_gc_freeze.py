"""The daemon's heap freeze when it first turns ready (`fleetd.daemon.freeze_startup_heap`)."""

from __future__ import annotations

import gc

from fleetd.daemon import freeze_startup_heap


def test_freeze_moves_live_objects_out_of_the_collected_generations() -> None:
    kept = [[i] for i in range(1000)]  # live, tracked objects like the fleet state's
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.isenabled()  # collection goes on for what is allocated afterwards
    finally:
        gc.unfreeze()
