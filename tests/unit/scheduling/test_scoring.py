"""Score plugins: one table per plugin, the arithmetic of each expected score in comments.

Unless a row says otherwise the node is gpu_node(): 64 cores, 512 GiB, 8 GPUs, and the
pod asks 1 core / 1 GiB. Each row is also scored by the scalar reference implementation.
"""

from __future__ import annotations

import numpy as np
import pytest

from scheduling import (
    Allocation,
    NodeView,
    PodSpec,
    Policy,
    ScoreResult,
    make_scorer,
    register_scorer,
)
from scheduling.filters import Free, compile_pod
from scheduling.reference import _nodes, _Reference
from scheduling.scoring import default_gpu_pick, scorer_names

from .builders import GIB, fleet_of, gpu_node, pod


def score_of(
    policy: str, p: PodSpec, allocs: tuple[Allocation, ...] = (), **node: object
) -> tuple[float, tuple[int, ...]]:
    f = fleet_of(gpu_node("n0", **node))  # type: ignore[arg-type]
    for a in allocs:
        f.allocate(a)
    pol = Policy.parse(policy)
    view = NodeView.of(f, Free.of(f), np.array([0], np.int64))
    s, pick = pol.evaluate(view, compile_pod(f, p))
    ref = _Reference(f, pol)
    ref_s, ref_pick = ref.score(_nodes(f)[0], p)
    assert (float(s[0]), int(pick[0])) == (ref_s, ref_pick)  # bit-identical
    m = int(pick[0])
    return float(s[0]), tuple(g for g in range(8) if (m >> g) & 1)


HALF = (Allocation("n0", 32_000, 256 * GIB, (0, 1, 2, 3), 1000),)  # half the node used

SCORES = [
    # least-allocated: mean of free-after / allocatable * 100
    # cpu (64000-1000)*100/64000 = 98.4375, mem (512-1)*100/512 = 99.8046875 -> mean 99.12109375
    ("least-allocated", pod(), (), 99.12109375, "least-empty-cpu-pod"),
    # + gpu (8000-1000)*100/8000 = 87.5 -> (98.4375 + 99.8046875 + 87.5) / 3 = 95.2473958...
    ("least-allocated", pod(num_gpu=1), (), (98.4375 + 99.8046875 + 87.5) / 3, "least-gpu-pod"),
    # cpu (32000-1000)*100/64000 = 48.4375, mem 255*100/512 = 49.8046875, gpu 3000*100/8000 = 37.5
    ("least-allocated", pod(num_gpu=1), HALF, (48.4375 + 49.8046875 + 37.5) / 3, "least-half-used"),
    # most-allocated: cpu 33000*100/64000 = 51.5625, mem 257*100/512 = 50.1953125, gpu 5000*100/8000 = 62.5
    ("most-allocated", pod(num_gpu=1), HALF, (51.5625 + 50.1953125 + 62.5) / 3, "most-half-used"),
    # best-fit: 100 * (1 - ((64000-1000)/128000*0.5 + (8000-1000)/8000*0.5))
    #         = 100 * (1 - (0.24609375 + 0.4375)) = 31.640625
    ("best-fit", pod(num_gpu=1), (), 31.640625, "best-fit-empty"),
    # after HALF: 100 * (1 - ((32000-1000)/128000*0.5 + (4000-1000)/8000*0.5)) = 100 * (1 - 0.3085...)
    (
        "best-fit",
        pod(num_gpu=1),
        HALF,
        100 * (1 - (31000 / 128000 * 0.5 + 3000 / 8000 * 0.5)),
        "best-fit-half",
    ),
    # dot-product: (free/alloc)*(req/alloc) per dim, cpu (1)(1000/64000) + mem (1)(1/512) + gpu (1)(1000/8000)
    #            = 0.015625 + 0.001953125 + 0.125 = 0.142578125 -> 100 * (1 - 0.142578125/3)
    (
        "dot-product",
        pod(num_gpu=1),
        (),
        100 * (1 - (0.015625 + 0.001953125 + 0.125) / 3),
        "dot-empty",
    ),
    # half used: every free ratio is 0.5 -> dot halves -> 100 * (1 - 0.0712890625/3)
    ("dot-product", pod(num_gpu=1), HALF, 100 * (1 - 0.0712890625 / 3), "dot-half"),
    # gpu-packing tier 3 (idle node): max(33 - 8 idle GPUs, 8) = 25
    ("gpu-packing", pod(gpu_milli=300), (), 25.0, "packing-idle-node"),
    # tier 2 (node in use, needs an untouched GPU): max(50 - 1, 33) = 49
    ("gpu-packing", pod(num_gpu=1), HALF, 49.0, "packing-used-node-fresh-gpu"),
    # tier 1 (fits on a GPU in use): GPU 4 has 400 free: 100 - (400*100//1000)//10 = 96
    (
        "gpu-packing",
        pod(gpu_milli=300),
        (Allocation("n0", 0, 0, (4,), 600),),
        96.0,
        "packing-shared-gpu",
    ),
    # CPU-only pods score 0 under gpu-packing
    ("gpu-packing", pod(), HALF, 0.0, "packing-cpu-pod"),
    # gpu-clustering: 2 GPUs with 500 used each, pod share 250 divides 500: tier 3 (all match);
    # 25 * (8000 - 7000) / 8000 + 75 = 78.125
    (
        "gpu-clustering",
        pod(gpu_milli=250),
        (Allocation("n0", 0, 0, (0, 1), 500),),
        78.125,
        "clustering-same",
    ),
    # share 300 does not divide 500: tier 0 -> 25 * 1000/8000 = 3.125
    (
        "gpu-clustering",
        pod(gpu_milli=300),
        (Allocation("n0", 0, 0, (0, 1), 500),),
        3.125,
        "clustering-other",
    ),
    # idle node: tier 1 -> 0 + 25 = 25
    ("gpu-clustering", pod(gpu_milli=300), (), 25.0, "clustering-idle"),
    # weighted sum: 2 * 25 (packing, idle node) + 1 * best-fit with a 300 share:
    # 100 * (1 - (63000/128000*0.5 + 7700/8000*0.5)) = 100 * (1 - (0.24609375 + 0.48125)) = 27.265625
    ("gpu-packing:2,best-fit:1", pod(gpu_milli=300), (), 2 * 25.0 + 27.265625, "weighted-sum"),
]


@pytest.mark.parametrize(
    ("policy", "p", "allocs", "expected", "case"), SCORES, ids=[c[4] for c in SCORES]
)
def test_score_table(
    policy: str, p: PodSpec, allocs: tuple[Allocation, ...], expected: float, case: str
) -> None:
    got, _ = score_of(policy, p, allocs)
    assert got == pytest.approx(expected, rel=1e-12)


PICKS = [
    # share 300: GPUs 0..3 used (free 0), GPU 5 has 400 free, GPU 6 has 350: best fit is 6
    (
        pod(gpu_milli=300),
        (
            Allocation("n0", 0, 0, (0, 1, 2, 3), 1000),
            Allocation("n0", 0, 0, (5,), 600),
            Allocation("n0", 0, 0, (6,), 650),
        ),
        (6,),
        "share-best-fit-gpu",
    ),
    # ties on free share go to the lowest index
    (pod(gpu_milli=300), (Allocation("n0", 0, 0, (2, 5), 500),), (2,), "share-tie-lowest-index"),
    # whole GPUs: the lowest-index untouched ones, skipping a partly used GPU 1
    (pod(num_gpu=3), (Allocation("n0", 0, 0, (1,), 100),), (0, 2, 3), "whole-lowest-free"),
    (pod(), (), (), "cpu-pod-no-gpu"),
]


@pytest.mark.parametrize(("p", "allocs", "expected", "case"), PICKS, ids=[c[3] for c in PICKS])
def test_default_gpu_pick(
    p: PodSpec, allocs: tuple[Allocation, ...], expected: tuple[int, ...], case: str
) -> None:
    _, pick = score_of("best-fit", p, allocs)
    assert pick == expected


def test_unhealthy_gpu_is_never_picked() -> None:
    f = fleet_of(gpu_node("n0", gpus=2))
    f.set_gpu_health("n0", 0, healthy=False)
    view = NodeView.of(f, Free.of(f), np.array([0], np.int64))
    assert default_gpu_pick(view, compile_pod(f, pod(gpu_milli=100))).tolist() == [2]


def test_policy_parse_forms_and_errors() -> None:
    assert Policy.parse("gpu-packing:2, best-fit").name == "gpu-packing:2,best-fit:1"
    assert Policy.parse({"spread": 1.5}).name == "least-allocated:1.5"  # alias
    assert (
        Policy.parse([("bestfit", 1)], params={"bestfit": {"max_gpu_milli": 16000}}).name
        == "best-fit:1"
    )
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        Policy.parse("nope")
    with pytest.raises(ValueError, match="bad weight"):
        Policy.parse("best-fit:heavy")
    with pytest.raises(ValueError, match="bad parameters"):
        make_scorer("best-fit", colour="red")
    with pytest.raises(ValueError, match="at least one"):
        Policy.parse("")


class _LastGpu:
    """A test plugin that chooses GPUs: the highest-index GPU with room."""

    name = "last-gpu"
    chooses_gpus = True

    def score(self, view: NodeView, c: object, pick: np.ndarray) -> ScoreResult:  # type: ignore[type-arg]
        free = view.gpu_free_milli
        g = free.shape[1] - 1 - np.argmax((free >= 1)[:, ::-1], axis=1)
        return ScoreResult(np.zeros(len(view)), np.left_shift(1, g).astype(np.int64))


def test_registered_plugin_can_choose_gpus() -> None:
    register_scorer("last-gpu", _LastGpu, replace=True)
    assert "last-gpu" in scorer_names()
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("last-gpu", _LastGpu)
    _, pick = score_of("last-gpu:1,best-fit:1", pod(gpu_milli=300))
    assert pick == (7,)


def test_random_is_seeded_and_deterministic() -> None:
    a, _ = score_of("random", pod())
    b, _ = score_of("random", pod())
    assert a == b
    assert 0 <= a < 100
    pol = Policy.parse("random", params={"random": {"seed": 7}})
    assert pol.terms[0][0].seed == 7  # type: ignore[attr-defined]
