"""The fragmentation scorers (fgd, fgd-cpu, fgd-plus) are state-only: their scores and GPU
choices depend on a node's state, never on its slot, so the engine may score one
representative row per distinct state, and a view may hold one slot several times in
different hypothetical states (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import Allocation, Fleet, NodeSpec, PodSpec, Policy, place, placement
from scheduling.filters import Free, compile_pod
from scheduling.fragmentation import (
    FragmentationMemo,
    FragmentationScorer,
    TypicalPods,
    typical_pods,
)
from scheduling.reference import place_reference
from scheduling.scoring import NodeView, default_gpu_pick, gpu_usable_matrix
from scheduling.workload import QueueItem

from .test_properties import fleets, pods, queues

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["fgd", "fgd-cpu", "fgd-plus"]


def _typical() -> TypicalPods:
    # Fleet model ids follow interning order ("A100" or "H100" first); spec 1 pins one of them,
    # so constraint-awareness and model pressure (scarcity) are exercised.
    return typical_pods(
        np.array([1000, 2000, 4000, 500, 8000, 2000]),
        np.array([1000, 500, 1000, 0, 250, 700]),
        np.array([1, 1, 2, 0, 1, 1]),
        np.array([0, 0, 0, 0, 1, 1]),
        np.array([[True, True], [False, True]]),
        model_gpus=np.array([8, 4]),
    )


def _policy(name: str) -> Policy:
    return Policy.parse(name, {name: {"typical": _typical()}})


def _scorer(name: str) -> FragmentationScorer:
    plugin = _policy(name).terms[0][0]
    assert isinstance(plugin, FragmentationScorer)
    assert plugin.state_only
    return plugin


@SETTINGS
@given(fleets(), queues(), st.sampled_from(NAMES), st.booleans())
def test_engine_and_reference_loop_agree_with_fragmentation_policies(
    f: Fleet, items: list[QueueItem], name: str, by_state: bool
) -> None:
    saved = placement._BY_STATE_RUN, placement._BY_STATE_MIN_PODS, placement._BY_PROFILE_SHAPES
    placement._BY_STATE_RUN = placement._BY_STATE_MIN_PODS = 0 if by_state else 1 << 30
    placement._BY_PROFILE_SHAPES = 1 if by_state else 1 << 30
    try:
        engine = place(f, items, _policy(name))
    finally:
        (
            placement._BY_STATE_RUN,
            placement._BY_STATE_MIN_PODS,
            placement._BY_PROFILE_SHAPES,
        ) = saved
    reference = place_reference(f, items, _policy(name))
    assert engine.decisions() == reference.decisions()


def _rows(view: NodeView, index: np.ndarray, slots: np.ndarray) -> NodeView:
    """Rows `index` of `view` (states and static attributes), labelled with `slots`."""
    return NodeView(
        slots=slots.astype(np.int64),
        cpu_free_millicores=view.cpu_free_millicores[index],
        memory_free_bytes=view.memory_free_bytes[index],
        cpu_allocatable_millicores=view.cpu_allocatable_millicores[index],
        memory_allocatable_bytes=view.memory_allocatable_bytes[index],
        gpu_free_milli=view.gpu_free_milli[index],
        gpu_usable=view.gpu_usable[index],
        gpu_model_id=view.gpu_model_id[index],
    )


@SETTINGS
@given(fleets(), st.lists(pods("p"), min_size=1, max_size=3), st.sampled_from(NAMES), st.data())
def test_scores_depend_on_state_not_slot(
    f: Fleet, shapes: list[PodSpec], name: str, data: st.DataObject
) -> None:
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    if rows.size == 0:
        return
    real = NodeView.of(f, Free.of(f), rows, gpu_usable_matrix(f))
    # Hypothetical states: each node's GPUs partly taken (a pod's candidate states).
    taken = real.gpu_free_milli - np.minimum(real.gpu_free_milli, 250)
    states = replace(
        _rows(real, np.arange(rows.size), rows),
        cpu_free_millicores=real.cpu_free_millicores - 500,
        gpu_free_milli=taken.astype(real.gpu_free_milli.dtype),
    )
    n = int(rows.size)
    # Views mixing both: rows in random order and repeated, all labelled with one slot
    # (a representative for many nodes, or one node in several hypothetical states).
    index = np.asarray(data.draw(st.lists(st.integers(0, 2 * n - 1), min_size=1, max_size=12)))
    label = np.full(index.size, rows[data.draw(st.integers(0, n - 1))])
    both = [real, states]
    for c in (compile_pod(f, p) for p in shapes):
        pick = np.zeros(n, np.int64)
        fresh = [_scorer(name).score(v, c, pick) for v in both]  # one fresh scorer per view
        scorer = _scorer(name)  # shared: it sees the mixed views first
        for k in range(2):
            sub = index[(index >= n * k) & (index < n * (k + 1))] - n * k
            mixed = scorer.score(_rows(both[k], sub, label[: sub.size]), c, pick[: sub.size])
            assert np.array_equal(mixed.score, fresh[k].score[sub])
            assert mixed.gpu_pick is not None
            assert fresh[k].gpu_pick is not None
            assert np.array_equal(mixed.gpu_pick, fresh[k].gpu_pick[sub])
        # One view holding one slot in both its real and hypothetical states.
        rep = np.concatenate([index % n, index % n])
        views = np.concatenate([np.zeros(index.size, int), np.ones(index.size, int)])
        merged = _concat(real, states, rep, views, label)
        result = scorer.score(merged, c, np.zeros(rep.size, np.int64))
        expect = np.concatenate([fresh[0].score[index % n], fresh[1].score[index % n]])
        assert np.array_equal(result.score, expect)
        for v in both:  # and the real nodes afterwards, by the shared scorer
            again = scorer.score(v, c, pick)
            assert np.array_equal(again.score, fresh[both.index(v)].score)
            assert again.gpu_pick is not None
            assert np.array_equal(again.gpu_pick, fresh[both.index(v)].gpu_pick)


class _IdSpace:
    """An id space for `NodeView.state_ids` (the engine uses its state classes)."""


@SETTINGS
@given(
    fleets(),
    st.lists(pods("p"), min_size=1, max_size=3),
    st.sampled_from(NAMES),
    st.integers(1, 40),
)
def test_state_ids_give_the_scores_of_the_states(
    f: Fleet, shapes: list[PodSpec], name: str, max_states: int
) -> None:
    # Views labelled with state ids are scored as the states they hold: ids met before are
    # looked up, a new id space or a memo starting afresh (a few states only) drops them.
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    if rows.size == 0:
        return
    n = int(rows.size)
    real = NodeView.of(f, Free.of(f), rows, gpu_usable_matrix(f))
    states = replace(
        real,
        cpu_free_millicores=real.cpu_free_millicores - 500,
        gpu_free_milli=(real.gpu_free_milli - np.minimum(real.gpu_free_milli, 250)).astype(
            real.gpu_free_milli.dtype
        ),
    )
    scorer = _scorer(name)
    scorer.memo = FragmentationMemo(
        scorer.memo.typical, scorer.constraint_aware, max_states=max_states
    )
    space, other = _IdSpace(), _IdSpace()
    pick = np.zeros(n, np.int64)
    for c in (compile_pod(f, p) for p in shapes):
        plain = _scorer(name)
        # Real states are ids 0..n-1 and taken ones n..2n-1; `other` numbers them the
        # other way round.
        for view, ids, where in (
            (real, np.arange(n), space),
            (states, np.arange(n) + n, space),
            (real, np.arange(n), space),  # ids met before: looked up
            (states, np.arange(n), other),
            (real, np.arange(n) + n, other),
        ):
            got = scorer.score(replace(view, state_ids=ids, state_space=where), c, pick)
            want = plain.score(view, c, pick)
            assert np.array_equal(got.score, want.score)
            assert got.gpu_pick is not None
            assert want.gpu_pick is not None
            assert np.array_equal(got.gpu_pick, want.gpu_pick)


def _concat(
    a: NodeView, b: NodeView, index: np.ndarray, which: np.ndarray, slots: np.ndarray
) -> NodeView:
    def pick(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(which.reshape(-1, *([1] * (x.ndim - 1))) == 0, x[index], y[index]).astype(
            x.dtype
        )

    return NodeView(
        slots=np.concatenate([slots, slots]).astype(np.int64),
        cpu_free_millicores=pick(a.cpu_free_millicores, b.cpu_free_millicores),
        memory_free_bytes=pick(a.memory_free_bytes, b.memory_free_bytes),
        cpu_allocatable_millicores=pick(a.cpu_allocatable_millicores, b.cpu_allocatable_millicores),
        memory_allocatable_bytes=pick(a.memory_allocatable_bytes, b.memory_allocatable_bytes),
        gpu_free_milli=pick(a.gpu_free_milli, b.gpu_free_milli),
        gpu_usable=pick(a.gpu_usable, b.gpu_usable),
        gpu_model_id=pick(a.gpu_model_id, b.gpu_model_id),
    )


@SETTINGS
@given(fleets(), st.integers(1, 4), st.integers(0, 3), st.sampled_from(NAMES))
def test_whole_gpu_picks_are_the_default_ones(
    f: Fleet, gpus: int, taken_quarters: int, name: str
) -> None:
    # `default_whole_gpus` lets the engine compute whole-GPU pods' deeper states in closed
    # form: the scorer must then pick exactly what `default_gpu_pick` picks.
    scorer = _scorer(name)
    assert scorer.default_whole_gpus
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    if rows.size == 0:
        return
    real = NodeView.of(f, Free.of(f), rows, gpu_usable_matrix(f))
    # Some GPUs partly taken, so that fewer are entirely free.
    part = np.where(
        np.arange(real.gpu_free_milli.shape[1]) % 2 == 0, 250 * taken_quarters, 0
    ).astype(real.gpu_free_milli.dtype)
    states = replace(real, gpu_free_milli=np.maximum(real.gpu_free_milli - part, 0))
    c = compile_pod(f, PodSpec("w", cpu_millicores=100, num_gpu=gpus))
    for v in (real, states):
        res = scorer.score(v, c, np.zeros(len(v), np.int64))
        assert res.gpu_pick is not None
        assert np.array_equal(res.gpu_pick, default_gpu_pick(v, c))


@SETTINGS
@given(
    fleets(),
    st.integers(1, 999),
    st.integers(0, 4000),
    st.integers(1, 12),
    st.integers(0, 6),
    st.sampled_from(NAMES),
    st.data(),
)
def test_chain_equals_scoring_step_by_step(
    f: Fleet, milli: int, cpu: int, steps: int, more: int, name: str, data: st.DataObject
) -> None:
    # The engine deepens a run of fractional pods with `Policy.chain`, which uses the
    # scorer's own chain: it must give exactly what scoring every state reached gives
    # (rows that run out of room included: their values are never read, but stay defined),
    # also when a second call continues the first with its carry, on a subset of the rows.
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    if rows.size == 0:
        return
    c = compile_pod(f, PodSpec("s", cpu_millicores=cpu, gpu_milli=milli))
    view = NodeView.of(f, Free.of(f), rows, gpu_usable_matrix(f))
    policy = _policy(name)
    _, pick = policy.evaluate(view, c)
    scores, picks, last, carry = policy.chain(view, c, pick, steps)
    assert carry is not None
    keep = np.asarray(
        sorted(data.draw(st.sets(st.integers(0, rows.size - 1), min_size=1))), np.int64
    )
    if more:
        sub = tuple(a[keep] for a in carry)
        more_scores, more_picks, last, _ = policy.chain(
            last.take(keep), c, picks[-1][keep], more, sub
        )
    step_policy = _policy(name)
    v = view
    for s, p in zip(scores, picks, strict=True):
        v = v.after(c, pick)
        expect, pick = step_policy.evaluate(v, c)
        assert np.array_equal(s, expect)
        assert np.array_equal(p, pick)
    assert len(scores) == steps
    if more:
        v, pick = v.take(keep), pick[keep]
        for s, p in zip(more_scores, more_picks, strict=True):
            v = v.after(c, pick)
            expect, pick = step_policy.evaluate(v, c)
            assert np.array_equal(s, expect)
            assert np.array_equal(p, pick)
    for column in ("cpu_free_millicores", "memory_free_bytes", "gpu_free_milli"):
        assert np.array_equal(getattr(last, column), getattr(v, column))


@pytest.mark.parametrize(
    ("name", "used", "milli", "cpu"),
    [
        # Per policy, a node (milli used per GPU) where it packs a share on a later GPU.
        ("fgd", (700, 800, 0, 100), 700, 1000),
        ("fgd-cpu", (100, 700, 100, 250), 300, 1000),
        ("fgd-plus", (700, 100, 250, 700), 100, 0),
    ],
)
def test_chain_when_a_pick_is_not_the_first_gpu_that_fits(
    name: str, used: tuple[int, ...], milli: int, cpu: int
) -> None:
    # The chain scores many steps at once, guessing that each pod takes the first GPU it
    # fits (fgd's usual pick), and checks every pick. A share packed next to another share
    # on a later GPU is a wrong guess: the steps after it must still be exactly those of
    # scoring step by step.
    f = Fleet(max_gpus=4)
    for i in range(3):
        f.add_node(NodeSpec(f"n{i}", "c", 64_000, 256 << 30, gpu_count=4, gpu_model="A100"))
    for gpu, milli_used in enumerate(used):
        if milli_used:
            f.allocate(Allocation("n1", 0, 0, (gpu,), milli_used))
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    view = NodeView.of(f, Free.of(f), rows, gpu_usable_matrix(f))
    c = compile_pod(f, PodSpec("s", cpu_millicores=cpu, gpu_milli=milli))
    policy = _policy(name)
    _, pick = policy.evaluate(view, c)
    # The chain's first state: n1 takes no pod yet (its first step is the wrong guess).
    pick[1] = 0
    steps = 12  # beyond some rows' room too
    scores, picks, last, _ = policy.chain(view, c, pick, steps)
    step_policy = _policy(name)
    v, guessed_wrong = view, False
    for s, p in zip(scores, picks, strict=True):
        v = v.after(c, pick)
        expect, pick = step_policy.evaluate(v, c)
        assert np.array_equal(s, expect)
        assert np.array_equal(p, pick)
        fits = v.gpu_free_milli >= milli
        first = np.where(fits.any(axis=1), 1 << fits.argmax(axis=1), 0)
        guessed_wrong |= not np.array_equal(pick, first)
    assert guessed_wrong  # the case this test is about happened
    for column in ("cpu_free_millicores", "memory_free_bytes", "gpu_free_milli"):
        assert np.array_equal(getattr(last, column), getattr(v, column))
