"""Property: nothing a client sends crashes the state owner or corrupts fleet usage.

Random Place requests (including negative, huge and malformed fields) either fail validation
with InvalidArgument naming a field, or reach the state owner, which answers with a decision
or a StateError; usage never exceeds a GPU and always equals what reservations hold.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from fleetd.api.validation import InvalidArgument, place_request
from fleetd.config import Config
from fleetd.engine import gpu_allocated_milli
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.state import FleetState, StateError
from fleetd.v1 import placement_pb2, types_pb2

GIB = 1024**3
# Mostly sane values with bad ones mixed in, so that many requests reach the state owner.
cpu = st.sampled_from([500, 1000, 4000, 64_000] * 5 + [-1, 2**62])
mem = st.sampled_from([GIB, 16 * GIB] * 10 + [0, -5, 2**62])
name = st.sampled_from(["", "", "", "p", "q"] * 4 + ["bad name", "a" * 300])

pod = st.builds(
    types_pb2.PodSpec,
    name=name,
    cpu_millicores=cpu,
    memory_bytes=mem,
    gpu_count=st.sampled_from([0, 1, 2, 4, 8] * 4 + [9, 100, 2**32 - 1]),
    gpu_milli=st.sampled_from([0] * 12 + [250, 500, 999, 1000]),
    gpu_models=st.lists(st.sampled_from(["A100"] * 6 + ["T4", "bad model!"]), max_size=1),
    node_selector=st.dictionaries(
        st.sampled_from(["fleetd.io/node-pool", "zone", "bad key!"]),
        st.sampled_from(["p1", "a", "bad value!"]),
        max_size=1,
    ),
)
workload = st.builds(
    types_pb2.Workload,
    workload_id=st.sampled_from(["w1", "w2", "w3", "w4"] * 4 + ["", "bad id!"]),
    team=st.sampled_from(["ml"] * 10 + ["", "bad team!"]),
    priority=st.sampled_from([0, 5, -3, 2**31 - 1]),
    cluster=st.sampled_from(["", "", "", "c1", "c1", "nope"]),
    pool=st.sampled_from(["", "", "", "p1", "p1", "nope"]),
    pod=pod,
) | st.builds(
    types_pb2.Workload,
    workload_id=st.sampled_from(["g1", "g2"]),
    team=st.just("ml"),
    gang=st.builds(
        types_pb2.GangSpec,
        pods=st.lists(pod, max_size=4),
        same=st.sampled_from(["", "", "cluster", "node", "rack", "bad"]),
    ),
)
requests = st.lists(
    st.builds(
        placement_pb2.PlaceRequest, workload=workload, ttl_s=st.sampled_from([0, 0, 0, 30, 10**9])
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(requests)
def test_any_request_is_answered_and_usage_stays_exact(
    reqs: list[placement_pb2.PlaceRequest],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        state = FleetState(cfg, Journal(Path(tmp) / "j.db"), lambda: 1000.0)
        state.expect_source("t", "c1")
        res = up.Resources(cpu_millicores=64_000, memory_bytes=512 * GIB, gpus=8)
        for i in range(2):
            state.apply_now(
                up.NodeUpdate("c1", f"n{i}", 1, res, res, gpu_model="A100", node_pool="p1")
            )
        state.apply_now(up.ClusterSynced("c1", "t"))
        valid = []
        fields = []
        for r in reqs:
            try:
                valid.append(place_request(r, cfg.limits, cfg.reservations.max_ttl_s))
            except InvalidArgument as exc:
                fields.append(exc.field)
        assert all(fields)  # every refusal names a field
        note(f"{len(valid)} of {len(reqs)} valid")
        event(f"valid requests: {min(len(valid), 3)}+" if valid else "all invalid")
        for result in state.place_batch(valid):
            assert not isinstance(result, Exception) or isinstance(result, StateError)
        used = {k: [0] * 8 for k in state.nodes}
        for held in state.held.values():
            for a in held.slots:
                if a is not None:
                    for g in a.gpu_indices:
                        used[a.node][g] += a.gpu_milli_per_gpu
        for key in state.nodes:
            got = gpu_allocated_milli(state.fleet, state.fleet.slot(key))
            assert got == used[key]
            assert all(0 <= m <= 1000 for m in got)
