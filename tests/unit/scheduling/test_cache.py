"""PlacementCache: decisions with a cache kept across calls equal those without one, after
any sequence of fleet mutations (hypothesis), and the cache notices every kind of change."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import (
    Allocation,
    Fleet,
    Order,
    PlacementCache,
    PodSpec,
    Policy,
    Taint,
    commit,
    place,
    placement,
    release,
)
from scheduling.fragmentation import typical_pods
from scheduling.placement import PlacementResult
from scheduling.workload import QueueItem

from .builders import GIB, fleet_of, gpu_node, pod
from .test_properties import POLICIES, fleets, queues

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fgd_plus() -> Policy:
    typical = typical_pods(
        np.array([1000, 2000, 4000, 500]),
        np.array([1000, 500, 1000, 0]),
        np.array([1, 1, 2, 0]),
        np.zeros(4, np.int64),
        np.ones((1, 2), bool),
    )
    return Policy.parse("fgd-plus", {"fgd-plus": {"typical": typical}})


def _mutate(f: Fleet, data: st.DataObject) -> None:
    """One random change made through the Fleet's methods."""
    names = f.node_names()
    op = data.draw(
        st.sampled_from(
            ["add", "remove", "update", "flags", "gpu", "alloc", "alloc", "alloc", "free", "free"]
        )
    )
    if op == "add" or not names:
        f.add_node(
            gpu_node(
                f"new{f.version}",
                gpus=data.draw(st.sampled_from([0, 2, 8])),
                cluster=data.draw(st.sampled_from(["c0", "c1", "c2"])),
                labels=data.draw(st.sampled_from([{}, {"pool": "a"}, {"pool": f"x{f.version}"}])),
                taints=data.draw(st.sampled_from([(), (Taint("dedicated", "ml"),)])),
            )
        )
        return
    name = data.draw(st.sampled_from(names))
    slot = f.slot(name)
    gpus = int(f.gpu_count[slot])
    if op == "remove":
        f.remove_node(name)
    elif op == "update":
        free_gpus = int((f.gpu_free_milli[slot, :gpus] == 1000).all())
        f.update_node(
            gpu_node(
                name,
                gpus=gpus if not free_gpus else data.draw(st.sampled_from([gpus, 4])),
                cpu_millicores=data.draw(st.sampled_from([8000, 64_000])),
                labels=data.draw(st.sampled_from([{}, {"pool": "a"}, {"pool": "b"}])),
                taints=data.draw(st.sampled_from([(), (Taint("spot", "1", "NoExecute"),)])),
            )
        )
    elif op == "flags":
        f.set_flags(name, cordoned=data.draw(st.booleans()), stale=data.draw(st.booleans()))
    elif op == "gpu" and gpus:
        f.set_gpu_health(name, data.draw(st.integers(0, gpus - 1)), data.draw(st.booleans()))
    elif op in ("alloc", "free") and gpus:
        g = data.draw(st.integers(0, gpus - 1))
        alloc = Allocation(name, 500, GIB, (g,), data.draw(st.sampled_from([250, 1000])))
        if op == "alloc" and f.fits(alloc):
            f.allocate(alloc)
        elif (
            op == "free"
            and int(f.gpu_free_milli[slot, g]) <= 1000 - alloc.gpu_milli_per_gpu
            and f.cpu_allocated_millicores[slot] >= 500
            and f.memory_allocated_bytes[slot] >= GIB
        ):
            f.free(alloc)


@st.composite
def gpu_fleets(draw: st.DrawFn) -> Fleet:
    # Mostly GPU nodes (the other properties' fleets start from CPU-only ones), some busy.
    f = draw(fleets())
    for i in range(draw(st.integers(2, 5))):
        f.add_node(
            gpu_node(
                f"g{i}",
                gpus=draw(st.sampled_from([8, 4, 2])),
                cluster=draw(st.sampled_from(["c0", "c1"])),
                cpu_millicores=draw(st.sampled_from([64_000, 16_000])),
            )
        )
        if draw(st.booleans()):
            f.allocate(Allocation(f"g{i}", 1000, GIB, (0,), draw(st.sampled_from([300, 1000]))))
    return f


@SETTINGS
@given(
    gpu_fleets(),
    st.lists(queues(), min_size=1, max_size=2),
    st.sampled_from([*POLICIES, "fgd-plus"]),
    st.sampled_from(list(Order)),
    st.sampled_from([False, False, True]),
    st.data(),
)
def test_cached_placement_equals_uncached_after_any_mutations(
    f: Fleet,
    queue_list: list[list[QueueItem]],
    policy_name: str,
    order: Order,
    by_state: bool,
    data: st.DataObject,
) -> None:
    policy = _fgd_plus() if policy_name == "fgd-plus" else Policy.parse(policy_name)
    cache = PlacementCache(max_shapes=data.draw(st.sampled_from([1, 64])))
    probe = PodSpec("probe", cpu_millicores=500, gpu_milli=data.draw(st.sampled_from([250, 600])))
    saved = placement._BY_STATE_RUN, placement._BY_STATE_MIN_PODS
    placement._BY_STATE_RUN = placement._BY_STATE_MIN_PODS = 0 if by_state else 1 << 30
    try:
        for _ in range(data.draw(st.integers(2, 12))):
            # A lone pod of a fixed shape (the daemon's case) or one of the queues.
            items = data.draw(st.sampled_from([*queue_list, [probe], [probe]]))
            before = f.copy()
            cached = place(f, items, policy, order=order, cache=cache)
            assert f.state_equal(before)  # place never mutates, cache or not
            plain = place(f, items, policy, order=order)
            assert cached.decisions() == plain.decisions()
            action = data.draw(st.sampled_from(["commit", "commit-release", "mutate", "mutate"]))
            if action.startswith("commit"):
                commit(f, cached)
                if action == "commit-release":
                    release(f, cached)
            else:
                for _ in range(data.draw(st.integers(1, 3))):
                    _mutate(f, data)
    finally:
        placement._BY_STATE_RUN, placement._BY_STATE_MIN_PODS = saved


def _decisions(
    r: PlacementResult,
) -> list[tuple[str, str | None, str | None, tuple[int, ...], int]]:
    return r.decisions()


@pytest.mark.parametrize("policy", ["gpu-packing:1,best-fit:1", "least-allocated", "random"])
def test_one_pod_at_a_time_with_cache_matches_without(policy: str) -> None:
    # The daemon's pattern: place one pod, commit it, place the next.
    nodes = [gpu_node(f"n{i}", gpus=8, cluster=f"c{i % 2}") for i in range(6)]
    a, b = fleet_of(*nodes), fleet_of(*nodes)
    cache = PlacementCache()
    for i in range(40):
        p = pod(f"p{i}", gpu_milli=[250, 500, 0, 300][i % 4], num_gpu=0)
        ra = place(a, [p], policy, cache=cache)
        rb = place(b, [p], policy)
        assert _decisions(ra) == _decisions(rb)
        commit(a, ra)
        commit(b, rb)
    assert a.state_equal(b)


def test_cache_sees_direct_writes_after_touch() -> None:
    f = fleet_of(gpu_node("n0", gpus=1), gpu_node("n1", gpus=1))
    cache = PlacementCache()
    whole = [pod("p", num_gpu=1)]
    assert place(f, whole, cache=cache).node(0) == "n0"
    f.gpu_free_milli[0, 0] = 0  # written directly (as a what-if copy might): not stamped
    f.touch(np.array([0]))
    assert place(f, whole, cache=cache).node(0) == "n1"


def test_cache_follows_one_fleet_and_one_policy() -> None:
    f = fleet_of(gpu_node("n0", gpus=8), gpu_node("n1", gpus=8))
    cache = PlacementCache()
    p = [pod("p", gpu_milli=500)]
    r1 = place(f, p, "most-allocated", cache=cache)
    g = f.copy()  # another fleet object: the cache starts afresh
    commit(g, r1)
    assert place(g, p, "most-allocated", cache=cache).decisions() == place(g, p).decisions()
    # A policy string is parsed once per cache, so its scores are kept.
    assert cache.policy_for("most-allocated") is cache.policy_for("most-allocated")
    other = place(g, p, "least-allocated", cache=cache)
    assert other.decisions() == place(g, p, "least-allocated").decisions()


def test_new_label_value_recompiles_constraints() -> None:
    # A selector on a value no node had compiles to "matches nothing"; once a node carries
    # it, the interner grows and the cache must recompile.
    f = fleet_of(gpu_node("n0", gpus=1))
    cache = PlacementCache()
    p = [PodSpec("p", cpu_millicores=100, node_selector={"pool": "new"})]
    assert place(f, p, cache=cache).node(0) is None
    f.add_node(gpu_node("n1", gpus=1, labels={"pool": "new"}))
    assert place(f, p, cache=cache).node(0) == "n1"


def test_cache_is_cleared_when_a_call_fails() -> None:
    f = fleet_of(gpu_node("n0", gpus=1))
    cache = PlacementCache()

    class Boom:
        name = "boom"
        chooses_gpus = False

        def score(self, *_: object) -> object:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        place(f, [pod("p", num_gpu=1)], Policy(((Boom(), 1.0),)), cache=cache)  # type: ignore[arg-type]
    assert cache.n == 0
    assert place(f, [pod("p", num_gpu=1)], cache=cache).node(0) == "n0"


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_shapes"):
        PlacementCache(max_shapes=0)


def test_changes_made_outside_place_are_rescored() -> None:
    # most-allocated prefers the fuller node: an allocation committed directly on n1 (not
    # by a placement through the cache) must move the next pod there.
    f = fleet_of(gpu_node("n0", gpus=8), gpu_node("n1", gpus=8))
    cache = PlacementCache()
    p = [pod("p", gpu_milli=500)]
    assert place(f, p, "most-allocated", cache=cache).node(0) == "n0"
    f.allocate(Allocation("n1", 8000, 8 * GIB, (0, 1), 1000))
    assert place(f, p, "most-allocated", cache=cache).node(0) == "n1"
    f.free(Allocation("n1", 8000, 8 * GIB, (0, 1), 1000))
    assert place(f, p, "most-allocated", cache=cache).node(0) == "n0"
