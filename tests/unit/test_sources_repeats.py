"""The per-record scan for repeats (`fleetd.sources.repeats`): its two variants agree record
for record, the compiled build agrees with its source, and the loader uses a build only when
it was compiled from the source in the tree."""

from __future__ import annotations

import array
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd import native
from fleetd.sources import repeats
from fleetd.sources.codec import _varint_bytes, decode_envelope_rests
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import Rec

KEYS = [b"c1/n0", b"c1/n1", b"c1/n2", b"c2/n3"]
HEADS = {b"c1": b"\x0a\x02c1\x10", b"c2": b"\x0a\x02c2\x10"}

#: What follows the envelope head in a record: usual envelopes, and what is not one (each
#: case of `decode_envelope_rests`'s refusals, and bytes at random).
_usual = st.builds(
    lambda seq, ms: _varint_bytes(seq) + (b"\x18" + _varint_bytes(ms) if ms is not None else b""),
    st.integers(1, 2**63 - 1),
    st.none() | st.integers(0, 2**63 - 1),
)
_ODD_RESTS = [b"", b"\x00", b"\x80", b"\x81\x81", b"\x01\x19\x01", b"\x01\x18",
              b"\x01\x18\x01\x00", b"\xff" * 9 + b"\x01", b"\x01\x18" + b"\xff" * 9 + b"\x01"]  # fmt: skip
_odd = st.sampled_from(_ODD_RESTS) | st.binary(max_size=12)
_tail = st.binary(min_size=1, max_size=40).map(lambda b: b"\x22" + b)


@st.composite
def polls(draw: Any) -> tuple[dict[bytes, tuple[bytes, bytes, int]], list[Rec], set[bytes], int]:
    """Remembered contents (key -> head, tail, slot), a poll's records, keys taken, a start."""
    contents = {
        key: (HEADS[key.split(b"/")[0]], draw(_tail), slot)
        for slot, key in enumerate(KEYS)
        if draw(st.booleans()) or slot == 0
    }
    records = []
    for offset in range(draw(st.integers(0, 30))):
        key = draw(st.sampled_from([*KEYS, None]))
        head, tail, _ = contents.get(key, (b"", b"", 0)) if key is not None else (b"", b"", 0)
        kind = draw(st.sampled_from(["repeat", "repeat", "odd", "other-tail", "none", "random"]))
        if kind == "repeat":
            value: bytes | None = head + draw(_usual) + tail
        elif kind == "odd":
            value = head + draw(_odd) + tail
        elif kind == "other-tail":
            value = head + draw(_usual) + draw(_tail)
        elif kind == "none":
            value = None
        else:
            value = draw(st.binary(max_size=50))
        records.append(Rec(key, value, offset))  # type: ignore[arg-type]
    taken = set(draw(st.lists(st.sampled_from(KEYS), max_size=2)))
    start = draw(st.integers(0, len(records)))
    return contents, records, taken, start


def _contents(module: ModuleType, spec: dict[bytes, tuple[bytes, bytes, int]]) -> dict[bytes, Any]:
    node = gpu_node(gpus=0, pods=0)
    return {
        key: module.Content("c", "n", slot, head, tail, node, repeats.UNKNOWN_LAYOUT, 0)
        for key, (head, tail, slot) in spec.items()
    }


def _scan(module: ModuleType, poll: Any) -> tuple[list[int], list[int], list[int], list[int]]:
    """Scan the poll from its start, stopping at each record that is no repeat and going on
    after it, as the source does: (stops, slots, (sequence, time) pairs flattened, odd)."""
    spec, records, taken, start = poll
    contents = _contents(module, spec)
    slots, sequences, times = array.array("q"), array.array("q"), array.array("q")
    odd: list[int] = []
    stops = []
    i = start
    while True:
        i = module.skip_repeats(
            records, i, len(records), contents, dict.fromkeys(taken), slots, sequences, times, odd
        )
        if i >= len(records):
            break
        stops.append(i)
        i += 1
    pairs = [x for pair in zip(sequences, times, strict=True) for x in pair]
    return stops, list(slots), pairs, odd


@settings(max_examples=300, deadline=None)
@given(polls())
def test_the_inline_scan_is_the_scan_with_the_envelopes_decoded_in_bulk(poll: Any) -> None:
    spec, records, taken, start = poll
    stops, slots, pairs, odd = _scan(repeats, poll)
    contents = _contents(repeats, spec)
    bulk_slots = array.array("q")
    rests: list[bytes] = []
    candidates: list[Any] = []
    bulk_stops = []
    i = start
    while True:
        i = repeats.skip_repeats_rests(
            records, i, len(records), contents, dict.fromkeys(taken), bulk_slots, rests, candidates
        )
        if i >= len(records):
            break
        bulk_stops.append(i)
        i += 1
    assert stops == bulk_stops
    sequences, times, ok = decode_envelope_rests(rests)
    index = {id(rec): at for at, rec in enumerate(records)}
    assert odd == [index[id(rec)] for rec, good in zip(candidates, ok, strict=True) if not good]
    assert slots == [s for s, good in zip(bulk_slots, ok, strict=True) if good]
    expected = zip(sequences[ok].tolist(), times[ok].tolist(), strict=True)
    assert pairs == [x for pair in expected for x in pair]
    # Every record is a repeat, a stop, or odd, once.
    assert len(slots) + len(stops) + len(odd) == len(records) - start


def _built() -> ModuleType | None:
    module = native.load(repeats)
    return module if native.is_native(module) else None


def test_the_compiled_scan_is_built_where_the_suite_requires_it() -> None:
    # `make install` builds it; CI runs on a machine with a C compiler, where its absence
    # means the build broke (fleetd would run interpreted, the slower, unnoticed).
    if os.environ.get("CI") or os.environ.get("FLEETD_NATIVE") == "required":
        assert _built() is not None, "fleetd.sources.repeats_native is not built from this tree"


@settings(max_examples=300, deadline=None)
@given(polls())
def test_the_compiled_scan_agrees_with_its_source(poll: Any) -> None:
    built = _built()
    if built is None:
        pytest.skip("not built here (test_the_compiled_scan_is_built... says when it must be)")
    assert _scan(built, poll) == _scan(repeats, poll)


def test_the_compiled_memory_behaves_as_its_source() -> None:
    built = _built()
    if built is None:
        pytest.skip("not built here")
    node = gpu_node(gpus=2, pods=2)
    for module in (repeats, built):
        memo = module.Content("c", "n", 3, b"h", b"tail", node, (b"spec", 1, None, None), 2)
        read = (memo.slot, memo.head_len, memo.spec, memo.gpus_at, memo.partition)
        assert read == (3, 1, b"spec", 1, 2)
        memo.replace(b"other", node, repeats.UNKNOWN_LAYOUT)
        assert (memo.tail, memo.spec, memo.gpus_at, memo.gpu_fields) == (b"other", None, -1, None)
        memo.partition = 5
        assert memo.partition == 5
        assert memo.known_gpus() == {}


def _package(tmp_path: Path, source: str, stamp: str | None) -> tuple[ModuleType, str]:
    """A package `pkg_native_test` holding `mod.py` and a stand-in build `mod_native.py`
    stamped with `stamp` (None: no build)."""
    root = tmp_path / "pkg_native_test"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "mod.py").write_text(source)
    if stamp is not None:
        (root / "mod_native.py").write_text(f'WHO = "native"\n{native.STAMP} = "{stamp}"\n')
    sys.path.insert(0, str(tmp_path))
    try:
        for name in ("pkg_native_test", "pkg_native_test.mod", "pkg_native_test.mod_native"):
            sys.modules.pop(name, None)
        module = importlib.import_module("pkg_native_test.mod")
        return native.load(module), hashlib.sha256(source.encode()).hexdigest()
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("pkg_native_test", "pkg_native_test.mod", "pkg_native_test.mod_native"):
            sys.modules.pop(name, None)


def test_a_build_of_the_current_source_is_used(tmp_path: Path) -> None:
    source = 'WHO = "source"\n'
    digest = hashlib.sha256(source.encode()).hexdigest()
    loaded, _ = _package(tmp_path, source, digest)
    assert loaded.WHO == "native"
    assert native.is_native(loaded)
    assert native.why_interpreted("pkg_native_test.mod") is None


def test_a_stale_or_missing_build_is_not_used(tmp_path: Path) -> None:
    loaded, _ = _package(tmp_path / "stale", 'WHO = "source"\n', "0" * 64)
    assert loaded.WHO == "source"
    assert not native.is_native(loaded)
    assert "another version of its source" in (native.why_interpreted(loaded.__name__) or "")
    loaded, _ = _package(tmp_path / "missing", 'WHO = "source"\n', None)
    assert loaded.WHO == "source"
    assert "not built" in (native.why_interpreted(loaded.__name__) or "")
