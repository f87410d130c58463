"""A fixture that runs a module's tests under both scans of the Kafka source: the compiled
`fleetd.sources.repeats_native` (when built: `test_sources_repeats` says where it must be)
and the interpreted `fleetd.sources.repeats`. `KafkaSource` picks its scan when
`fleetd.sources.kafka` is imported, so without this the tests only ever ran the one loaded.

    from tests.unit.scans import both_scans  # noqa: F401  (the fixture, autouse)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetd import native
from fleetd.sources import kafka, repeats


@pytest.fixture(scope="module", autouse=True, params=["compiled", "interpreted"])
def both_scans(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of the module once with each scan (module-scoped: hypothesis's tests
    may not use function-scoped fixtures)."""
    if request.param == "compiled":
        module = native.load(repeats)
        if not native.is_native(module):
            pytest.skip("the compiled scan is not built here")
    else:
        module = repeats
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kafka, "_repeats", module)
        patch.setattr(kafka, "_NATIVE_SCAN", native.is_native(module))
        yield request.param
