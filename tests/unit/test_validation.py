"""Request validation: every bad field is named; good requests become WorkloadRequests."""

from __future__ import annotations

from typing import Any

import pytest

from fleetd.api.validation import InvalidArgument, place_request, workload_request
from fleetd.config import LimitsConfig
from fleetd.v1 import placement_pb2, types_pb2

LIMITS = LimitsConfig()


def wl(pod: dict[str, Any] | None = None, **kw: Any) -> types_pb2.Workload:
    fields: dict[str, Any] = {"workload_id": "w", "team": "ml"}
    fields.update(kw)
    if "gang" not in fields:
        fields["pod"] = types_pb2.PodSpec(**({"gpu_count": 1} if pod is None else pod))
    return types_pb2.Workload(**fields)


def gang(*pods: dict[str, Any], same: str = "") -> types_pb2.GangSpec:
    return types_pb2.GangSpec(pods=[types_pb2.PodSpec(**p) for p in pods], same=same)


@pytest.mark.parametrize(
    ("workload", "field"),
    [
        pytest.param(wl(workload_id=""), "workload.workload_id", id="missing-id"),
        pytest.param(wl(workload_id="has space"), "workload.workload_id", id="bad-id"),
        pytest.param(wl(team=""), "workload.team", id="missing-team"),
        pytest.param(wl(priority=2_000_000), "workload.priority", id="absurd-priority"),
        pytest.param(wl({"cpu_millicores": -1}), "workload.pod.cpu_millicores", id="negative-cpu"),
        pytest.param(wl({"memory_bytes": -5}), "workload.pod.memory_bytes", id="negative-memory"),
        pytest.param(
            wl({"cpu_millicores": 10**12}), "workload.pod.cpu_millicores", id="absurd-cpu"
        ),
        pytest.param(wl({"memory_bytes": 2**62}), "workload.pod.memory_bytes", id="absurd-memory"),
        pytest.param(wl({"gpu_count": 10_000}), "workload.pod.gpu_count", id="absurd-gpus"),
        pytest.param(wl({"gpu_milli": 1000}), "workload.pod.gpu_milli", id="share-too-big"),
        pytest.param(wl({"gpu_count": 1, "gpu_milli": 500}), "workload.pod.gpu_milli", id="both"),
        pytest.param(wl({}), "workload.pod", id="requests-nothing"),
        pytest.param(
            wl({"gpu_count": 1, "gpu_models": ["A100", "bad model!"]}),
            "workload.pod.gpu_models[1]",
            id="gpu-model-syntax",
        ),
        pytest.param(
            wl({"gpu_count": 1, "node_selector": {"zone": "a b"}}),
            "workload.pod.node_selector",
            id="selector-value",
        ),
        pytest.param(
            wl({"gpu_count": 1, "tolerations": [types_pb2.Toleration(key="k", operator="Maybe")]}),
            "workload.pod.tolerations[0].operator",
            id="toleration-operator",
        ),
        pytest.param(
            wl({"gpu_count": 1, "tolerations": [types_pb2.Toleration(key="k", value="v" * 64)]}),
            "workload.pod.tolerations[0].value",
            id="toleration-value-too-long",
        ),
        pytest.param(
            wl(
                {
                    "gpu_count": 1,
                    "tolerations": [types_pb2.Toleration(key="k", operator="Exists", value="v")],
                }
            ),
            "workload.pod.tolerations[0].value",
            id="toleration-exists-with-value",
        ),
        pytest.param(
            wl({"gpu_count": 1, "tolerations": [types_pb2.Toleration(operator="Exists")] * 65}),
            "workload.pod.tolerations",
            id="too-many-tolerations",
        ),
        pytest.param(wl(gang=gang()), "workload.gang.pods", id="empty-gang"),
        pytest.param(
            wl(gang=gang({"gpu_count": 1}, {"gpu_count": 1, "gpu_milli": 3})),
            "workload.gang.pods[1].gpu_milli",
            id="gang-pod-field",
        ),
        pytest.param(
            wl(gang=gang({"name": "a", "gpu_count": 1}, {"name": "a", "gpu_count": 1})),
            "workload.gang.pods[1].name",
            id="duplicate-pod-names",
        ),
        pytest.param(
            wl(gang=gang({"gpu_count": 1}, same="pool")), "workload.gang.same", id="bad-topology"
        ),
        pytest.param(
            wl(gang=gang(*[{"gpu_count": 1}] * (LIMITS.max_gang_pods + 1))),
            "workload.gang.pods",
            id="gang-too-large",
        ),
        pytest.param(wl(cluster="bad cluster"), "workload.cluster", id="bad-cluster-name"),
        pytest.param(types_pb2.Workload(workload_id="w", team="ml"), "workload.spec", id="no-spec"),
    ],
)
def test_invalid_fields_are_named(workload: types_pb2.Workload, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        workload_request(workload, LIMITS)
    assert err.value.field.startswith(field)
    assert str(err.value).startswith(field)


def test_place_request_checks_ttl_and_presence() -> None:
    with pytest.raises(InvalidArgument, match=r"^workload"):
        place_request(placement_pb2.PlaceRequest(), LIMITS, 3600)
    with pytest.raises(InvalidArgument, match=r"^ttl_s"):
        place_request(placement_pb2.PlaceRequest(workload=wl(), ttl_s=7200), LIMITS, 3600)


def test_good_gang_becomes_pod_requests() -> None:
    req = workload_request(
        wl(gang=gang({"gpu_count": 8, "cpu_millicores": 1000}, {"gpu_milli": 250}), priority=5),
        LIMITS,
    )
    assert [p.name for p in req.pods] == ["w-0", "w-1"]
    assert (req.pods[0].gpu_count, req.pods[1].gpu_milli) == (8, 250)
    assert req.gang
    assert req.priority == 5


def test_fingerprint_is_stable_and_distinguishes_requests() -> None:
    a = workload_request(wl({"gpu_count": 1, "node_selector": {"a": "1", "b": "2"}}), LIMITS)
    b = workload_request(wl({"gpu_count": 1, "node_selector": {"b": "2", "a": "1"}}), LIMITS)
    c = workload_request(wl({"gpu_count": 2}), LIMITS)
    assert a.fingerprint == b.fingerprint != c.fingerprint
