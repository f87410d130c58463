"""FGD's fragmentation measure (Weng et al., ATC'23, section 4) on hand-computed tables."""

from __future__ import annotations

import numpy as np
import pytest

from scheduling import Allocation, Fleet, NodeSpec, PodSpec, Policy, place
from scheduling.fragmentation import (
    FragmentationMemo,
    TypicalPods,
    candidate_states,
    cpu_milli_per_gpu_milli,
    cpu_stranded_gpu_milli,
    eventual_waste_milli,
    fgd_score,
    frag_after,
    frag_milli,
    model_pressure,
    scarcity_milli,
    typical_pods,
)

# Target workload used by the tables below (two node models: 0 and 1):
#   A: 4000m CPU, one 500-milli share,           freq 0.50, any model
#   B: 2000m CPU, no GPU (CPU-only),              freq 0.25
#   C: 8000m CPU, two whole GPUs (2 x 1000),      freq 0.25, model 0 only
TYPICAL = TypicalPods(
    cpu_milli=np.array([4000, 2000, 8000]),
    gpu_milli=np.array([500, 0, 1000]),
    num_gpu=np.array([1, 0, 2]),
    model_allowed=np.array([[True, True], [True, True], [True, False]]),
    freq=np.array([0.5, 0.25, 0.25]),
)


def state(cpu: int, gpus: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([cpu]), np.array([gpus])


@pytest.mark.parametrize(
    ("cpu", "gpus", "model", "expected"),
    [
        # Idle 2-GPU node: A fits (no GPU below 500 -> 0), B counts all 2000 idle, C fits (0).
        # F = 0.5*0 + 0.25*2000 + 0.25*0 = 500
        (16000, [1000, 1000], 0, 500.0),
        # GPU0 has 300 left: A fits on GPU1, GPU0 (300 < 500) is a fragment -> 300;
        # B -> 1300; C needs two free GPUs, only one -> all 1300.
        # F = 0.5*300 + 0.25*1300 + 0.25*1300 = 150 + 325 + 325 = 800
        (16000, [300, 1000], 0, 800.0),
        # Same GPUs, 3000m CPU: A lacks CPU (Q4) -> 1300; B 1300; C 1300. F = 1300
        (3000, [300, 1000], 0, 1300.0),
        # Model 1: C may not use it (NoAccess) -> 2000; A 0; B 2000. F = 0 + 500 + 500 = 1000
        (16000, [1000, 1000], 1, 1000.0),
        # Nothing idle: nothing to fragment. F = 0
        (0, [0, 0], 0, 0.0),
        # One GPU with 600 left, CPU plenty: A fits, 0 below 500 -> 0; B 600; C 600.
        # F = 0 + 150 + 150 = 300
        (16000, [600, 0], 0, 300.0),
    ],
    ids=["idle", "share-remnant", "cpu-lacking", "model-no-access", "full", "one-gpu-left"],
)
def test_frag_milli_table(cpu: int, gpus: list[int], model: int, expected: float) -> None:
    cpu_left, gpu_left = state(cpu, gpus)
    assert frag_milli(cpu_left, gpu_left, np.array([model]), TYPICAL)[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("gpus", "model", "artifact", "aware"),
    [
        # Model 1, idle: C may not use it. Artifact (NoAccess): C counts all 2000 idle,
        # F = 0.5*0 + 0.25*2000 + 0.25*2000 = 1000; constraint-aware: C counts 0, F = 500.
        ([1000, 1000], 1, 1000.0, 500.0),
        # Model 1, GPU0 300 left: A 300, B 1300, C 1300 (artifact) or 0 (aware).
        # Artifact 150 + 325 + 325 = 800; aware 150 + 325 = 475.
        ([300, 1000], 1, 800.0, 475.0),
        # Model 0: every type may use it, both measures agree (the share-remnant row above).
        ([300, 1000], 0, 800.0, 800.0),
    ],
    ids=["idle-no-access", "remnant-no-access", "accessible"],
)
def test_constraint_aware_frag_counts_only_types_that_may_use_the_node(
    gpus: list[int], model: int, artifact: float, aware: float
) -> None:
    cpu_left, gpu_left = state(16000, gpus)
    models = np.array([model])
    assert frag_milli(cpu_left, gpu_left, models, TYPICAL)[0] == pytest.approx(artifact)
    assert frag_milli(cpu_left, gpu_left, models, TYPICAL, True)[0] == pytest.approx(aware)


@pytest.mark.parametrize(
    ("pinned_count", "expected"),
    [
        # Fleet: model 0 has 6 GPUs, model 1 has 2 (8 in all). Types: U 1 x 1000 any model,
        # 5 pods (5000 milli); R 2 x 1000 on model 0 only, 1 pod (2000); CPU-only, 10 pods
        # (no GPU demand); P 1 x 1000 on model 1 only, `pinned_count` pods.
        # 2 P pods: demand 9000. P: 2000/9000 x 8/2 = 0.889 on model 1;
        #   R: 2000/9000 x 8/6 = 0.296 on model 0. U accepts every model: left out.
        (2, [0.2963, 0.8889]),
        # 5 P pods: demand 12000. P: 5000/12000 x 4 = 1.667, clipped to 1;
        #   R: 2000/12000 x 8/6 = 0.222.
        (5, [0.2222, 1.0]),
    ],
    ids=["pinned-small-model", "oversubscribed-clipped"],
)
def test_model_pressure_table(pinned_count: int, expected: list[float]) -> None:
    allowed = np.array([[True, True], [True, False], [True, True], [False, True]])
    pressure = model_pressure(
        gpu_milli=np.array([1000, 1000, 0, 1000]),
        num_gpu=np.array([1, 2, 0, 1]),
        model_allowed=allowed,
        count=np.array([5, 1, 10, pinned_count]),
        model_gpus=np.array([6, 2]),
    )
    assert pressure.tolist() == pytest.approx(expected, abs=1e-4)


def test_model_pressure_of_an_unconstrained_workload_is_zero() -> None:
    pressure = model_pressure(
        np.array([500]), np.array([1]), np.ones((1, 3), bool), np.array([7]), np.array([8, 8, 2])
    )
    assert pressure.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("accepts", "expected"),
    [
        # Pressure [0.3, 0.9, 0.0]; nodes of models 0, 1, 2 and a GPU-less node (-1); a pod of
        # 1000 milli. Any model: floor 0.0 -> 1000 x [0.3, 0.9, 0.0, 0] = [300, 900, 0, 0].
        (None, [300.0, 900.0, 0.0, 0.0]),
        # Models 0 and 1: floor 0.3 -> [0, 600]; model 2 is below the floor: 0.
        ([0, 1], [0.0, 600.0, 0.0, 0.0]),
        # Pinned to model 1: floor 0.9, nothing to choose: 0 everywhere.
        ([1], [0.0, 0.0, 0.0, 0.0]),
        # A model id unknown to the fleet (-1) is ignored: as pinned to model 0.
        ([0, -1], [0.0, 600.0, 0.0, 0.0]),
    ],
    ids=["any-model", "two-models", "pinned", "unknown-model"],
)
def test_scarcity_milli_table(accepts: list[int] | None, expected: list[float]) -> None:
    pressure = np.array([0.3, 0.9, 0.0])
    ids = None if accepts is None else np.array(accepts)
    got = scarcity_milli(pressure, np.array([0, 1, 2, -1]), ids, 1000)
    assert got.tolist() == pytest.approx(expected)


def test_typical_pods_pressure_counts_every_pod_not_only_the_typical_ones() -> None:
    # 19 unconstrained whole-GPU pods and 1 pinned to model 1 (2 of the fleet's 10 GPUs).
    # The 95 % cut keeps only the unconstrained shape, but the pressure still sees the pinned
    # pod: 1000/20000 x 10/2 = 0.25 on model 1.
    spec = np.array([0] * 19 + [1])
    typical = typical_pods(
        cpu_milli=np.full(20, 1000),
        gpu_milli=np.full(20, 1000),
        num_gpu=np.ones(20, int),
        spec_id=spec,
        spec_allowed=np.array([[True, True], [False, True]]),
        model_gpus=np.array([8, 2]),
    )
    assert typical.n_types == 1
    assert typical.model_pressure is not None
    assert typical.model_pressure.tolist() == pytest.approx([0.0, 0.25])


def test_fgd_plus_keeps_flexible_pods_off_a_model_pinned_pods_need() -> None:
    # Fleet: n0 model "B" (id 0), n1 model "A" (id 1), 2 idle GPUs each, CPU plenty.
    # Workload: U (1 GPU, any model) and P (1 GPU, B only), one pod each: P's 1000 of the
    # 2000 demand lands on B's 2 of 4 GPUs: pressure B = 0.5 x 4/2 = 1.0, A = 0.
    # A U pod: FGD's measure stays 0 on both nodes (U and P still fit), so both score
    # int(100 s(0)) = 50 and a tie goes to n0 (B). The scarcity term adds 1000 x 1.0 against
    # B: int(100 s(-1)) = 26, so fgd-plus takes n1 (A).
    fleet = Fleet(max_gpus=2)
    for name, model in (("n0", "B"), ("n1", "A")):
        fleet.add_node(NodeSpec(name, "c", 64000, 64 << 30, gpu_count=2, gpu_model=model))
    typical = typical_pods(
        cpu_milli=np.array([1000, 1000]),
        gpu_milli=np.array([1000, 1000]),
        num_gpu=np.array([1, 1]),
        spec_id=np.array([0, 1]),
        spec_allowed=np.array([[True, True], [True, False]]),
        model_gpus=np.array([2, 2]),
    )
    pod = [PodSpec("u", cpu_millicores=1000, num_gpu=1)]
    without = {"typical": typical, "scarcity_weight": 0.0}
    with_scarcity = {"typical": typical}
    assert place(fleet, pod, Policy.parse("fgd-plus", {"fgd-plus": without})).node(0) == "n0"
    assert place(fleet, pod, Policy.parse("fgd-plus", {"fgd-plus": with_scarcity})).node(0) == "n1"
    # A pod pinned to B has no choice and pays nothing for it.
    pinned = [PodSpec("p", cpu_millicores=1000, num_gpu=1, gpu_models=("B",))]
    assert (
        place(fleet, pinned, Policy.parse("fgd-plus", {"fgd-plus": with_scarcity})).node(0) == "n0"
    )


def test_frag_milli_is_vectorized_over_nodes() -> None:
    cpu = np.array([16000, 16000, 3000])
    gpus = np.array([[1000, 1000], [300, 1000], [300, 1000]])
    assert frag_milli(cpu, gpus, np.array([0, 0, 0]), TYPICAL).tolist() == pytest.approx(
        [500, 800, 1300]
    )


def test_candidate_states_fractional_one_per_gpu() -> None:
    # 250 milli on [300, 1000]: GPU0 -> [50, 1000], GPU1 -> [300, 750]; CPU 16000 - 1000.
    cpu_after, gpu_after, valid = candidate_states(
        np.array([16000]), np.array([[300, 1000]]), 1000, 250, 1
    )
    assert valid.tolist() == [[True, True]]
    assert gpu_after.tolist() == [[[50, 1000], [300, 750]]]
    assert cpu_after.tolist() == [[15000, 15000]]


def test_candidate_states_whole_gpus_take_lowest_free_indices() -> None:
    # Two whole GPUs on [300, 1000, 1000, 1000]: GPUs 1 and 2 -> [300, 0, 0, 1000].
    _, gpu_after, valid = candidate_states(
        np.array([8000]), np.array([[300, 1000, 1000, 1000]]), 0, 1000, 2
    )
    assert valid.tolist() == [[True]]
    assert gpu_after.tolist() == [[[300, 0, 0, 1000]]]


def test_frag_after_marks_infeasible_gpus() -> None:
    # 500 milli on [300, 1000] (model 0, CPU 16000 -> 12000 after A's 4000):
    #   GPU0 has 300 < 500: infeasible (inf).
    #   GPU1 -> [300, 500]: A fits on GPU1 (500 >= 500), fragment = 300 -> 0.5*300 = 150;
    #   B: 800 idle -> 200; C: no two free GPUs -> 800 -> 200. F = 550.
    after = frag_after(
        np.array([16000]), np.array([[300, 1000]]), np.array([0]), TYPICAL, 4000, 500, 1
    )
    assert np.isinf(after[0, 0])
    assert after[0, 1] == pytest.approx(550.0)


def test_frag_milli_of_a_state_does_not_depend_on_its_batch() -> None:
    # The engine and the reference loop score a state in different batches (many rows, one
    # row); a last-bit difference turns a pod that leaves fragmentation unchanged (score 50)
    # into a 49 on one side. Each row's value must be the same whatever rows come with it.
    rng = np.random.default_rng(11)
    n = 257
    gpus = np.minimum(rng.integers(0, 11, (n, 2)) * 100 + rng.integers(0, 3, (n, 2)), 1000)
    cpu = rng.integers(0, 20000, n)
    model = rng.integers(-1, 2, n)
    freq = rng.dirichlet(np.ones(40))
    typical = TypicalPods(
        cpu_milli=rng.integers(0, 9000, 40),
        gpu_milli=rng.choice([0, 100, 250, 500, 1000], 40),
        num_gpu=rng.integers(1, 3, 40),
        model_allowed=rng.random((40, 2)) < 0.7,
        freq=freq,
    )
    for aware in (False, True):
        whole = frag_milli(cpu, gpus, model, typical, aware)
        for start, size in ((0, 1), (5, 1), (3, 2), (7, 3), (1, 5), (10, 17), (100, 150)):
            part = slice(start, start + size)
            got = frag_milli(cpu[part], gpus[part], model[part], typical, aware)
            assert np.array_equal(got, whole[part])


@pytest.mark.parametrize("aware", [False, True])
@pytest.mark.parametrize("n", [3, 400])  # few candidates, and many (deduplicated)
def test_frag_after_of_a_share_equals_scoring_each_candidate_state(aware: bool, n: int) -> None:
    # frag_after computes a fractional pod's candidates from the node's own GPU statistics;
    # it must give exactly (bit for bit) frag_milli of every candidate state.
    rng = np.random.default_rng(7)
    gpus = np.minimum(rng.integers(0, 11, (n, 4)) * 100 + rng.integers(0, 2, (n, 4)), 1000)
    gpus[rng.random((n, 4)) < 0.2] = 1000
    cpu = rng.integers(0, 20000, n)
    model = rng.integers(-1, 2, n)
    for milli in (1, 100, 250, 500, 700, 999):
        for pod_cpu in (0, 2000, 4000):
            got = frag_after(cpu, gpus, model, TYPICAL, pod_cpu, milli, 1, aware)
            cpu_after, gpu_after, valid = candidate_states(cpu, gpus, pod_cpu, milli, 1)
            each = frag_milli(
                cpu_after.reshape(-1), gpu_after.reshape(n * 4, 4), np.repeat(model, 4),
                TYPICAL, aware,
            )  # fmt: skip
            assert np.array_equal(got, np.where(valid, each.reshape(n, 4), np.inf))


@pytest.mark.parametrize(
    ("now", "after", "expected"),
    [
        (1000.0, 1000.0, 50),  # no change: 100 * sigmoid(0) = 50
        (1000.0, 0.0, 73),  # 1000 less fragment: 100 * sigmoid(1) = 73.1 -> 73
        (0.0, 1000.0, 26),  # 1000 more: 100 * sigmoid(-1) = 26.9 -> 26
        (500.0, 480.0, 50),  # 20 milli: 100 * sigmoid(0.02) = 50.49 -> 50 (a tie)
        (500.0, 400.0, 52),  # 100 milli: 100 * sigmoid(0.1) = 52.49 -> 52
        (500.0, np.inf, -1),  # infeasible candidate
    ],
)
def test_fgd_score_is_the_artifacts_integer_score(now: float, after: float, expected: int) -> None:
    assert fgd_score(np.array([now]), np.array([after]))[0] == expected


def test_typical_pods_threshold_and_renormalization() -> None:
    # Shapes (cpu, milli, num, spec): X x5, Y x3, Z x2 (10 pods). 70% -> 7 pods expected:
    # X (cum 5 < 7), then Y (cum 8 >= 7): keep X, Y with freq 5/8, 3/8.
    cpu = np.array([1000] * 5 + [2000] * 3 + [3000] * 2)
    milli = np.array([500] * 5 + [1000] * 3 + [0] * 2)
    num = np.array([1] * 5 + [1] * 3 + [0] * 2)
    spec = np.zeros(10, dtype=np.int64)
    allowed = np.ones((1, 2), dtype=bool)
    typical = typical_pods(cpu, milli, num, spec, allowed, popularity_threshold_pct=70)
    assert typical.cpu_milli.tolist() == [1000, 2000]
    assert typical.freq.tolist() == pytest.approx([5 / 8, 3 / 8])


def test_typical_pods_ties_prefer_larger_cpu_and_zero_cpu_reads_as_100() -> None:
    # Two shapes of 2 pods each; the artifact's reverse sort puts the larger CPU first.
    # A zero CPU request is read as kube-scheduler's default 100m.
    cpu = np.array([0, 0, 5000, 5000])
    milli = np.array([0, 0, 0, 0])
    typical = typical_pods(cpu, milli, np.zeros(4), np.zeros(4), np.ones((1, 1), dtype=bool), 50)
    # 50% of 4 = 2: the first shape alone reaches it.
    assert typical.cpu_milli.tolist() == [5000]
    typical_all = typical_pods(
        cpu, milli, np.zeros(4), np.zeros(4), np.ones((1, 1), dtype=bool), 100
    )
    assert typical_all.cpu_milli.tolist() == [5000, 100]


def test_cpu_stranding() -> None:
    # GPU types: A 4000m per 500 milli (freq .5), C 8000m per 2000 milli (freq .25):
    # ratio = (0.5*4000 + 0.25*8000) / (0.5*500 + 0.25*2000) = 4000 / 750 = 5.333 m per milli.
    ratio = cpu_milli_per_gpu_milli(TYPICAL)
    assert ratio == pytest.approx(4000 / 750)
    # 2000 idle milli, 5333m CPU feeds 1000 milli -> 1000 stranded; 16000m feeds all -> 0.
    stranded = cpu_stranded_gpu_milli(np.array([2000, 2000]), np.array([5333.33333, 16000]), ratio)
    assert stranded.tolist() == pytest.approx([1000, 0], abs=1e-3)


def test_memo_matches_direct_computation_after_changes() -> None:
    rng = np.random.default_rng(7)
    cpu = rng.integers(0, 20000, size=30)
    gpus = rng.choice([0, 300, 500, 1000], size=(30, 4))
    model = rng.integers(0, 2, size=30)
    memo = FragmentationMemo(TYPICAL)
    for step in range(5):
        ids = memo.states(cpu, gpus, model)
        assert np.allclose(memo.frag_now(ids), frag_milli(cpu, gpus, model, TYPICAL))
        direct = frag_after(cpu, gpus, model, TYPICAL, 4000, 500, 1)
        assert np.array_equal(memo.frag_after(ids, 4000, 500, 1), direct)
        # A subset of the rows, in another order, as the engine's candidate rows.
        sub = np.arange(30)[::-3]
        sub_ids = memo.states(cpu[sub], gpus[sub], model[sub])
        assert np.array_equal(sub_ids, ids[sub])
        assert np.array_equal(memo.frag_after(sub_ids, 4000, 500, 1), direct[sub])
        node = step * 3
        cpu, gpus = cpu.copy(), gpus.copy()
        cpu[node] = max(0, cpu[node] - 1000)
        gpus[node, 0] = 0


def test_memo_keys_states_not_rows_and_stays_bounded() -> None:
    # Equal states share an id whatever row holds them; any field differing separates them.
    cpu = np.array([8000, 8000, 8000, 8000, 4000])
    gpus = np.array([[500, 1000], [500, 1000], [1000, 500], [500, 1000], [500, 1000]])
    model = np.array([0, 0, 0, 1, 0])
    memo = FragmentationMemo(TYPICAL, max_states=4)
    ids = memo.states(cpu, gpus, model)
    assert ids[0] == ids[1]
    assert len(set(ids.tolist())) == 4
    assert len(memo) == 4
    assert np.array_equal(memo.frag_now(ids), frag_milli(cpu, gpus, model, TYPICAL))
    # A fifth state exceeds max_states: the memo starts afresh and values stay exact.
    more = memo.states(np.array([100]), np.array([[0, 0]]), np.array([0]))
    assert len(memo) == 1
    expected = frag_after(np.array([100]), np.array([[0, 0]]), np.array([0]), TYPICAL, 0, 0, 0)
    assert np.array_equal(memo.frag_after(more, 0, 0, 0), expected)
    # A byte budget of 0: every call starts afresh, values still exact.
    tight = FragmentationMemo(TYPICAL, max_bytes=0)
    for _ in range(2):
        ids = tight.states(cpu, gpus, model)
        assert np.array_equal(tight.frag_now(ids), frag_milli(cpu, gpus, model, TYPICAL))
        direct = frag_after(cpu, gpus, model, TYPICAL, 4000, 500, 1)
        assert np.array_equal(tight.frag_after(ids, 4000, 500, 1), direct)
    assert tight.nbytes() > 0


def two_node_fleet(cpu: tuple[int, int]) -> Fleet:
    # Model "A" gets fleet id 0, matching TYPICAL's first model column.
    fleet = Fleet(max_gpus=2)
    for name, millicores in zip(("n0", "n1"), cpu, strict=True):
        fleet.add_node(NodeSpec(name, "c", millicores, 64 << 30, gpu_count=2, gpu_model="A"))
    return fleet


def test_fgd_scorer_in_the_engine_packs_a_share_next_to_a_share() -> None:
    # n1 already holds a 500 share on GPU0: [500, 1000]; n0 is idle: [1000, 1000].
    # A 500 share (4000m):
    #   on n0 GPU0 -> [500, 1000]: F 500 -> 750 (B, C see 1500 idle): score int(100 s(-0.25)) = 43
    #   on n1 GPU0 -> [0, 1000]:   F 750 -> 500 (B, C see 1000 idle): score int(100 s(0.25)) = 56
    #   on n1 GPU1 -> [500, 500]:  F 750 -> 500 as well: 56, GPU0 wins the tie (lowest index).
    fleet = two_node_fleet((16000, 16000))
    fleet.allocate(Allocation("n1", 0, 0, (0,), 500))
    result = place(
        fleet,
        [PodSpec("p", cpu_millicores=4000, gpu_milli=500)],
        Policy.parse("fgd", {"fgd": {"typical": TYPICAL}}),
    )
    assert (result.node(0), result.gpu_indices(0)) == ("n1", (0,))


def test_fgd_cpu_keeps_cpu_only_pods_off_cpu_poor_nodes() -> None:
    # CPU-only 4000m pod; n0 has 12000m, n1 64000m, both GPUs idle (2000 milli).
    # FGD: n0 12000 -> 8000 still hosts every type (C needs 8000): delta 0, score 50; n1 too:
    #   a tie, so FGD takes n0 (lowest slot).
    # fgd-cpu: ratio 5.333m per milli (see test_cpu_stranding); n0 feeds 12000/5.333 = 2250
    #   milli before (0 stranded), 8000/5.333 = 1500 after: 500 stranded -> score
    #   int(100 s(-0.5)) = 37; n1 stays 50: fgd-cpu takes n1.
    pod = PodSpec("p", cpu_millicores=4000)
    fgd = place(
        two_node_fleet((12000, 64000)), [pod], Policy.parse("fgd", {"fgd": {"typical": TYPICAL}})
    )
    cpu = place(
        two_node_fleet((12000, 64000)),
        [pod],
        Policy.parse("fgd-cpu", {"fgd-cpu": {"typical": TYPICAL}}),
    )
    assert (fgd.node(0), cpu.node(0)) == ("n0", "n1")


def test_fgd_needs_a_target_workload() -> None:
    with pytest.raises(ValueError, match="fgd"):
        Policy.parse("fgd")


def test_eventual_waste_lookahead_table() -> None:
    # GPU types of TYPICAL: 500-milli share (freq .5) and 2 x 1000 (freq .25, needs a whole
    # free GPU); renormalized 2/3 and 1/3. V[L] = L below 500 (nothing fits);
    # V[L] = V[L - 500] = L - 500 on 500..999 (only the share fits);
    # V[1000] = 2/3 V[500] + 1/3 V[0] = 0.
    waste = eventual_waste_milli(TYPICAL)
    assert waste[[0, 300, 499, 500, 700, 999, 1000]].tolist() == [0, 300, 499, 0, 200, 499, 0]


def test_fgd_plus_lookahead_prefers_the_remnant_that_can_be_filled() -> None:
    # Shares of 500 only (plus 2-GPU pods): a 300 share on a GPU with 800 free leaves 500
    # (V = 0, fillable), on a fresh GPU leaves 700 (V = 200). FGD's one-step measure sees
    # 500 and 700 both hosting the next 500 share, so it ties and takes n0 (lowest slot);
    # the lookahead adds 0.25 x (200 - 0) = 50 milli against n0 and takes n1.
    fleet = Fleet(max_gpus=1)
    fleet.add_node(NodeSpec("n0", "c", 64000, 64 << 30, gpu_count=1, gpu_model="A"))
    fleet.add_node(NodeSpec("n1", "c", 64000, 64 << 30, gpu_count=1, gpu_model="A"))
    fleet.allocate(Allocation("n1", 0, 0, (0,), 200))
    pod = [PodSpec("p", cpu_millicores=1000, gpu_milli=300)]
    params = {"typical": TYPICAL}
    assert place(fleet, pod, Policy.parse("fgd", {"fgd": params})).node(0) == "n0"
    assert place(fleet, pod, Policy.parse("fgd-plus", {"fgd-plus": params})).node(0) == "n1"


def test_model_refinements_change_nothing_without_model_constraints() -> None:
    # Every type accepts every model: the constraint-aware measure equals the artifact's
    # bit for bit, and the pressure is 0 everywhere, so fgd-plus on a workload without
    # gpu_spec scores exactly as before the two refinements.
    rng = np.random.default_rng(7)
    free = rng.choice([0, 190, 530, 1000], size=(50, 4))
    cpu = rng.integers(0, 64000, size=50)
    model = rng.integers(0, 2, size=50)
    typical = typical_pods(
        cpu_milli=np.array([4000, 2000, 8000, 3000]),
        gpu_milli=np.array([500, 0, 1000, 810]),
        num_gpu=np.array([1, 0, 2, 1]),
        spec_id=np.zeros(4, int),
        spec_allowed=np.ones((1, 2), bool),
        model_gpus=np.array([16, 4]),
    )
    artifact = frag_milli(cpu, free, model, typical)
    assert np.array_equal(frag_milli(cpu, free, model, typical, True), artifact)
    assert typical.model_pressure is not None
    assert typical.model_pressure.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "pod",
    [
        PodSpec("share", cpu_millicores=4000, gpu_milli=500),
        PodSpec("whole", cpu_millicores=8000, num_gpu=2),
        PodSpec("cpu", cpu_millicores=2000),
    ],
)
def test_scores_kept_per_state_equal_scoring_each_state_afresh(pod: PodSpec) -> None:
    # fgd-plus keeps each state's score and pick per pod shape: a view mixing states seen
    # before (in other rows, other views) and new ones gives, row by row, the same floats
    # and picks as a fresh scorer shown that row alone.
    from scheduling.filters import compile_pod
    from scheduling.scoring import NodeView

    fleet = two_node_fleet((16000, 16000))
    c = compile_pod(fleet, pod)
    rng = np.random.default_rng(3)

    def view(n: int) -> NodeView:
        return NodeView(
            slots=np.zeros(n, np.int64),
            cpu_free_millicores=rng.choice([0, 2000, 4000, 9000, 16000], n).astype(np.int64),
            memory_free_bytes=np.full(n, 64 << 30, np.int64),
            cpu_allocatable_millicores=np.full(n, 16000, np.int64),
            memory_allocatable_bytes=np.full(n, 64 << 30, np.int64),
            gpu_free_milli=rng.choice([0, 300, 500, 1000], (n, 2)).astype(np.int32),
            gpu_usable=np.ones((n, 2), np.bool_),
            gpu_model_id=rng.integers(0, 2, n).astype(np.int16),
        )

    params = {"typical": TYPICAL}
    kept = Policy.parse("fgd-plus", {"fgd-plus": params})
    for n in (5, 40, 40, 3):
        v = view(n)
        scores, picks = kept.evaluate(v, c)
        for i in range(n):
            fresh = Policy.parse("fgd-plus", {"fgd-plus": params})
            s1, p1 = fresh.evaluate(v.take(np.array([i])), c)
            assert scores[i].tobytes() == s1[0].tobytes()
            assert picks[i] == p1[0]


@pytest.mark.parametrize("name", ["fgd", "fgd-cpu", "fgd-plus"])
def test_share_scores_from_per_gpu_tables_equal_the_generic_path(name: str) -> None:
    # A fractional pod's scores and GPU picks come from per-GPU tables of the types'
    # statistics (`_share_step`, which the engine's chain steps with too); they must be,
    # bit for bit, those of frag_milli, frag_after and the refinements computed the
    # generic way (`_scores`), for every model, CPU and scarcity case.
    from scheduling.filters import compile_pod
    from scheduling.fragmentation import FragmentationScorer

    typical = TypicalPods(
        cpu_milli=TYPICAL.cpu_milli,
        gpu_milli=TYPICAL.gpu_milli,
        num_gpu=TYPICAL.num_gpu,
        model_allowed=TYPICAL.model_allowed,
        freq=TYPICAL.freq,
        model_pressure=np.array([0.4, 0.1]),
    )
    fleet = Fleet(max_gpus=4)
    for node, model_name in (("a", "A"), ("b", "B")):
        fleet.add_node(NodeSpec(node, "c", 16000, 64 << 30, gpu_count=4, gpu_model=model_name))
    scorer = Policy.parse(name, {name: {"typical": typical}}).terms[0][0]
    assert isinstance(scorer, FragmentationScorer)
    rng = np.random.default_rng(11)
    n = 300
    gpus = np.minimum(rng.integers(0, 11, (n, 4)) * 100 + rng.integers(0, 2, (n, 4)), 1000)
    gpus[rng.random((n, 4)) < 0.3] = 1000
    cpu = rng.integers(0, 20000, n)
    model = rng.integers(-1, 2, n)
    aware = scorer.constraint_aware
    now = frag_milli(cpu, gpus, model, typical, aware)
    for milli in (1, 100, 250, 500, 700, 999):
        for pod_cpu in (0, 4000):
            for models in ((), ("A",), ("A", "B")):
                pod = PodSpec("s", cpu_millicores=pod_cpu, gpu_milli=milli, gpu_models=models)
                c = compile_pod(fleet, pod)
                after = frag_after(cpu, gpus, model, typical, pod_cpu, milli, 1, aware)
                scores, _ = scorer._scores(c, cpu, gpus, model, now, after)
                best = scores.max(axis=1)
                ids = scorer.memo.states(cpu, gpus, model)
                got = scorer._share_scores(cpu, gpus, model, ids, c.model_ids, pod_cpu, milli)
                assert got is not None
                assert scorer.memo.frag_now(ids).tobytes() == now.tobytes()
                assert got[0].tobytes() == np.where(best >= 0, best, -np.inf).tobytes()
                expect_pick = np.where(best >= 0, 1 << scores.argmax(axis=1), 0)
                assert np.array_equal(got[1], expect_pick)
