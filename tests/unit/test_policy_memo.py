"""fleetd.engine.PolicyMemo: the daemon keeps one Policy object (and so the core's cached
scores) while FGD's target workload moves less than TARGET_TOLERANCE."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleetd import engine
from scheduling import Fleet, NodeSpec

GIB = 1 << 30


def _fleet() -> Fleet:
    f = Fleet()
    f.add_node(NodeSpec("c/n0", "c", 64_000, 256 * GIB, 8, "A100", 81_920))
    return f


def _target(one_gpu: int, share: int) -> engine.TargetWorkload:
    t = engine.TargetWorkload(window=1000)
    t.observe([engine.PodRequest("a", 2000, GIB, gpu_count=1)] * one_gpu)
    t.observe([engine.PodRequest("b", 1000, GIB, gpu_milli=500)] * share)
    return t


def test_target_distance_is_total_variation() -> None:
    f = _fleet()
    a = _target(80, 20).typical(f)
    b = _target(70, 30).typical(f)
    c = _target(100, 0).typical(f)
    assert a is not None
    assert b is not None
    assert c is not None
    # 0.5 * (|0.8 - 0.7| + |0.2 - 0.3|) = 0.1; a type missing on one side counts as 0:
    # 0.5 * (|0.8 - 1.0| + |0.2 - 0|) = 0.2
    assert np.isclose(engine.target_distance(a, b), 0.1)
    assert np.isclose(engine.target_distance(a, c), 0.2)
    assert engine.target_distance(a, a) == 0.0


def test_same_policy_object_until_the_target_moves_materially() -> None:
    f = _fleet()
    memo = engine.PolicyMemo(tolerance=0.05)
    first = memo.build("fgd-plus", _target(80, 20).typical(f))
    # 0.5 * (0.03 + 0.03) = 0.03 <= 0.05: the same object, the first target kept.
    assert memo.build("fgd-plus", _target(77, 23).typical(f)) is first
    assert memo.builds == 1
    # 0.5 * (0.1 + 0.1) = 0.1 from the target in use (drift accumulates): a new policy.
    moved = memo.build("fgd-plus", _target(70, 30).typical(f))
    assert moved is not first
    assert memo.typical is not None
    assert np.isclose(engine.target_distance(memo.typical, _target(70, 30).typical(f)), 0.0)  # type: ignore[arg-type]
    # Another spec always rebuilds; no target yet falls back to the default policy.
    assert memo.build("fgd", memo.typical) is not moved
    assert memo.build("fgd", None) is not None
    assert memo.typical is None


def test_the_daemon_keeps_its_policy_while_requests_look_alike(tmp_path: Path) -> None:
    # fgd-plus (the default) re-estimates its target every target_refresh_pods requests;
    # identical requests do not move it, so the Policy object (and the core's cached
    # scores) stay; a different mix gives a new one.
    from .test_state import FakeClock, make_state, request

    state = make_state(tmp_path / "j.sqlite3", FakeClock(), nodes=4)
    refresh = state.config.scheduling.target_refresh_pods
    state.place(request("w0"))
    first = state.policy
    for i in range(1, 2 * refresh + 1):
        state.place(request(f"w{i}"))
        state.release(f"w{i}")
    assert state.policy is first
    for i in range(2 * refresh + 1, 3 * refresh + 2):
        state.place(request(f"s{i}", gpus=0, milli=500))
        state.release(f"s{i}")
    assert state.policy is not first


def test_target_is_recomputed_only_when_the_window_moved() -> None:
    f = _fleet()
    t = engine.TargetWorkload(window=100, tolerance=0.05)
    t.observe([engine.PodRequest("a", 2000, GIB, gpu_count=1)] * 100)
    first = t.typical(f)
    # 3 of 100 pods replaced: 0.5 * (0.03 + 0.03) = 0.03 <= 0.05, the same estimate.
    t.observe([engine.PodRequest("b", 1000, GIB, gpu_milli=500)] * 3)
    assert t.typical(f) is first
    # 3 more (drift counts from the estimate in use): 0.06 > 0.05, a new estimate.
    t.observe([engine.PodRequest("b", 1000, GIB, gpu_milli=500)] * 3)
    second = t.typical(f)
    assert second is not first
    assert second is not None
    assert np.isclose(sorted(second.freq.tolist())[0], 0.06)
    # A window filled directly (as a config reload does) is recounted.
    moved = engine.TargetWorkload(window=100, tolerance=0.0)
    moved.shapes.extend(t.shapes)
    again = moved.typical(f)
    assert again is not None
    assert engine.target_distance(again, second) == 0.0


def test_daemon_target_carries_per_model_scarcity() -> None:
    # fgd-plus's scarcity term needs the fleet's GPUs per model: half the GPU demand pinned
    # to T4, which holds 8 of the fleet's 16 GPUs: pressure = 0.5 x 16 / 8 = 1.0 on T4;
    # unconstrained pods add nothing, so A100 has 0.
    f = _fleet()  # c/n0: 8 x A100 (model id 0)
    f.add_node(NodeSpec("c/n1", "c", 64_000, 256 * GIB, 8, "T4", 16_384))
    t = engine.TargetWorkload(window=100, tolerance=0.05)
    t.observe([engine.PodRequest("p", 2000, GIB, gpu_count=1, gpu_models=("T4",))] * 50)
    t.observe([engine.PodRequest("u", 2000, GIB, gpu_count=1)] * 50)
    first = t.typical(f)
    assert first is not None
    assert first.model_pressure is not None
    assert np.allclose(first.model_pressure, [0.0, 1.0])
    # The same requests on a fleet whose GPUs are spread the same way: the same estimate.
    assert t.typical(f) is first
    # Three more T4 nodes (T4 now 32 of 40 GPUs; the model shares moved by 0.3 > 0.05):
    # re-estimated, pressure 0.5 x 40 / 32 = 0.625, and the policy in use is replaced.
    for i in range(2, 5):
        f.add_node(NodeSpec(f"c/n{i}", "c", 64_000, 256 * GIB, 8, "T4", 16_384))
    second = t.typical(f)
    assert second is not None
    assert second is not first
    assert second.model_pressure is not None
    assert np.allclose(second.model_pressure, [0.0, 0.625])
    assert np.isclose(engine.target_distance(first, second), 0.375)
    memo = engine.PolicyMemo(tolerance=0.05)
    kept = memo.build("fgd-plus", first)
    assert memo.build("fgd-plus", second) is not kept
