"""The per-record scan for repeats (`fleetd.sources.repeats`): its two variants agree record
for record, the compiled build agrees with its source, and the loader uses a build only when
it was compiled from the source in the tree."""

from __future__ import annotations

import array
import importlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd import native
from fleetd.sources import repeats
from fleetd.sources.codec import (
    _varint_bytes,
    decode_envelope_rests,
    gpus_start,
    node_content_tail,
    node_offset_in_tail,
    parse,
    pods_start,
)
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import Rec
from tests.unit.test_sources_unchanged import _value

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
_tail = st.binary(min_size=1, max_size=40).map(lambda b: b"\x22" + b) | st.sampled_from(
    [b"2\x10", b"\x10", b"c1\x10\x01"]  # (tails a head overlaps: records too short for both)
)


@st.composite
def polls(
    draw: Any,
) -> tuple[dict[bytes, tuple[bytes, bytes, int]], list[Rec], set[bytes], int, int]:
    """Remembered contents (key -> head, tail, slot), a poll's records, keys taken, where the
    scan starts and ends."""
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
        if kind == "repeat" and draw(st.integers(0, 9)) == 0:
            # Head and tail alone (overlapping when the tail starts as the head ends).
            records[-1] = Rec(key, head + tail, offset)  # type: ignore[arg-type]
    taken = set(draw(st.lists(st.sampled_from(KEYS), max_size=2)))
    start = draw(st.integers(0, len(records)))
    end = draw(st.integers(start, len(records)))
    return contents, records, taken, start, end


def _contents(module: ModuleType, spec: dict[bytes, tuple[bytes, bytes, int]]) -> dict[bytes, Any]:
    node = gpu_node(gpus=0, pods=0)
    return {
        key: module.Content("c", "n", slot, head, tail, node, repeats.UNKNOWN_LAYOUT, 0)
        for key, (head, tail, slot) in spec.items()
    }


def _scan(module: ModuleType, poll: Any) -> tuple[list[int], list[int], list[int], list[int]]:
    """Scan the poll from its start to its end, stopping at each record that is no repeat and
    going on after it, as the source does: (stops, slots, (sequence, time) pairs flattened,
    odd)."""
    spec, records, taken, start, end = poll
    contents = _contents(module, spec)
    slots, sequences, times = array.array("q"), array.array("q"), array.array("q")
    odd: list[int] = []
    stops = []
    i = start
    while True:
        i = module.skip_repeats(
            records, i, end, contents, dict.fromkeys(taken), slots, sequences, times, odd
        )
        if i >= end:
            break
        stops.append(i)
        i += 1
    pairs = [x for pair in zip(sequences, times, strict=True) for x in pair]
    return stops, list(slots), pairs, odd


@settings(max_examples=300, deadline=None)
@given(polls())
def test_the_inline_scan_is_the_scan_with_the_envelopes_decoded_in_bulk(poll: Any) -> None:
    spec, records, taken, start, end = poll
    stops, slots, pairs, odd = _scan(repeats, poll)
    contents = _contents(repeats, spec)
    bulk_slots = array.array("q")
    rests: list[bytes] = []
    candidates: list[Any] = []
    bulk_stops = []
    i = start
    while True:
        i = repeats.skip_repeats_rests(
            records, i, end, contents, dict.fromkeys(taken), bulk_slots, rests, candidates
        )
        if i >= end:
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
    assert len(slots) + len(stops) + len(odd) == end - start


def _built() -> ModuleType | None:
    module = native.load(repeats)
    return module if native.is_native(module) else None


def test_the_compiled_scan_is_built_where_a_c_compiler_is() -> None:
    # `make` builds it where a C compiler and Python's headers are (and fails when it
    # cannot): absent or stale here, fleetd would run interpreted, slower, unnoticed.
    mode = os.environ.get("FLEETD_NATIVE") or "auto"
    if mode == "required" or (mode == "auto" and native.compiler() is None):
        assert _built() is not None, (
            f"fleetd.sources.repeats_native: {native.why_interpreted(repeats.__name__)}"
        )


def test_no_compiler_is_found_when_cc_names_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert "no C compiler" in (native.compiler() or "")


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
    # A real node's content: its pods and GPUs split from its bytes when first asked.
    value = _value(node, 1)
    tail = node_content_tail(value, parse(value))
    assert tail is not None
    at = node_offset_in_tail(tail)
    start = pods_start(tail[at:], parse(value))
    spec = tail[at : at + start]
    layout = (spec, gpus_start(spec, parse(value)), None, repeats.SPLIT_LATER)
    for module in (repeats, built):
        memo = module.Content("c1", "n1", 0, b"h", tail, node, layout, 0)
        assert list(memo.known_pods().values()) == list(node.pods)
        assert list(memo.known_gpus().values()) == list(node.gpus)
        assert memo.gpu_fields is not repeats.SPLIT_LATER  # (split, and kept)


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
        return native.load(module), native.source_digest("pkg_native_test.mod", tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("pkg_native_test", "pkg_native_test.mod", "pkg_native_test.mod_native"):
            sys.modules.pop(name, None)


def test_a_build_of_the_current_source_is_used(tmp_path: Path) -> None:
    source = 'WHO = "source"\n'
    (tmp_path / "pkg_native_test").mkdir()
    (tmp_path / "pkg_native_test" / "mod.py").write_text(source)
    digest = native.source_digest("pkg_native_test.mod", tmp_path)
    shutil.rmtree(tmp_path / "pkg_native_test")
    loaded, _ = _package(tmp_path, source, digest)
    assert loaded.WHO == "native"
    assert native.is_native(loaded)
    assert native.why_interpreted("pkg_native_test.mod") is None


def test_a_stale_or_missing_build_is_not_used(tmp_path: Path) -> None:
    loaded, _ = _package(tmp_path / "stale", 'WHO = "source"\n', "0" * 64)
    assert loaded.WHO == "source"
    assert not native.is_native(loaded)
    assert "other sources" in (native.why_interpreted(loaded.__name__) or "")
    loaded, _ = _package(tmp_path / "missing", 'WHO = "source"\n', None)
    assert loaded.WHO == "source"
    assert "not built" in (native.why_interpreted(loaded.__name__) or "")


def test_a_build_is_installed_by_rename_so_running_processes_keep_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writing over a loaded extension in place crashes the process that mapped it (SIGBUS);
    # a new file renamed over it leaves that process its old one.
    repo = tmp_path / "repo"
    (repo / "fleetd" / "sources").mkdir(parents=True)
    for name in ("repeats", "codec", "updates"):
        (repo / "fleetd" / "sources" / f"{name}.py").write_text(f"# {name}\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stamp = native.source_digest("fleetd.sources.repeats", repo)
    entry = native._cache_dir() / native._cache_key(stamp)
    entry.mkdir(parents=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (entry / f"repeats_native{suffix}").write_bytes(b"new build")
    (entry / f"repeats_native__mypyc{suffix}").write_bytes(b"new library")
    old = repo / "fleetd" / "sources" / f"repeats_native{suffix}"
    old.write_bytes(b"old build")
    with old.open("rb") as held:  # (a process running the old build)
        path = native.build("fleetd.sources.repeats", repo)
        assert path == old
        assert path.read_bytes() == b"new build"
        assert held.read() == b"old build"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["codec.py", "repeats.py", "updates.py", path.name, f"repeats_native__mypyc{suffix}"]
    )


def test_a_build_of_other_sources_is_stale(tmp_path: Path) -> None:
    # The stamp covers the fleetd modules the compiled one imports: compiled code keeps the
    # types of what it calls.
    (tmp_path / "fleetd" / "sources").mkdir(parents=True)
    for name in ("repeats", "codec", "updates"):
        (tmp_path / "fleetd" / "sources" / f"{name}.py").write_text(f"# {name}\n")
    before = native.source_digest("fleetd.sources.repeats", tmp_path)
    (tmp_path / "fleetd" / "sources" / "codec.py").write_text("# codec, changed\n")
    assert native.source_digest("fleetd.sources.repeats", tmp_path) != before
