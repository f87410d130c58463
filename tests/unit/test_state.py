"""The state owner: serialization, reservations (confirm, expire, restore), staleness, updates.

A real SQLite journal in tmp_path; the clock is injected; "kill" = reopening the file while
the old connection was never closed.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from fleetd.config import Config
from fleetd.engine import PodRequest, gpu_allocated_milli
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.state import (
    CLUSTER_SYNC_LOST_TEXT,
    POD_NAME_LABEL,
    WORKLOAD_LABEL,
    Conflict,
    FleetState,
    NotFound,
    NotReady,
    OutOfRange,
    QueueFull,
    WorkloadRequest,
)

GIB = 1024**3


class FakeClock:
    def __init__(self, now_s: float = 1_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def node(
    name: str, seq: int, gpus: int = 8, model: str = "A100", cluster: str = "c1", **kw: object
) -> up.NodeUpdate:
    res = up.Resources(cpu_millicores=64_000, memory_bytes=512 * GIB, gpus=gpus)
    return up.NodeUpdate(
        cluster=cluster, name=name, sequence=seq, capacity=res, allocatable=res,
        gpu_model=model, node_pool="p1", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def request(wid: str, gpus: int = 1, milli: int = 0, n: int = 1, **kw: object) -> WorkloadRequest:
    pods = tuple(
        PodRequest(
            name=f"{wid}-{i}",
            cpu_millicores=1000,
            memory_bytes=GIB,
            gpu_count=gpus,
            gpu_milli=milli,
        )
        for i in range(n)
    )
    return WorkloadRequest(
        wid, "ml", 0, pods, gang=n > 1, fingerprint=f"{wid}:{gpus}:{milli}:{n}", **kw
    )  # type: ignore[arg-type]


def make_state(path: Path, clock: FakeClock, nodes: int = 2) -> FleetState:
    state = FleetState(Config(), Journal(path), clock)
    state.expect_source("test", "c1")
    for i in range(nodes):
        state.apply_now(node(f"n{i}", seq=1))
    state.apply_now(up.ClusterSynced("c1", "test"))
    return state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def gpu_usage(state: FleetState) -> list[list[int]]:
    return [gpu_allocated_milli(state.fleet, state.fleet.slot(k)) for k in sorted(state.nodes)]


async def test_concurrent_places_are_serialized(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)

    async def one(i: int) -> str:
        await asyncio.sleep(0)  # interleave the callers
        return state.place(
            request(f"w{i}", gpus=0 if i % 2 else 1, milli=400 if i % 2 else 0)
        ).result

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert max(max(g) for g in gpu_usage(state)) <= 1000
    placed = results.count("placed")
    # 16 GPUs: 8 whole-GPU pods need 8, then 400-milli shares pack 2 per GPU on the rest.
    assert placed == sum(1 for _ in state.held)
    assert placed + results.count("queued") == 200


def test_not_ready_until_synced(tmp_path: Path, clock: FakeClock) -> None:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    state.apply_now(node("n0", 1))
    with pytest.raises(NotReady, match="kafka/c1"):
        state.place(request("w"))
    state.apply_now(up.ClusterSynced("c1", "kafka"))
    assert state.place(request("w")).result == "placed"


def test_lost_cluster_leaves_placement_until_it_resyncs(tmp_path: Path, clock: FakeClock) -> None:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    state.expect_source("kafka", "c2")
    state.expect_source("kubernetes", "k1")
    state.apply_now(node("n0", seq=1))
    state.apply_now(node("m0", seq=1, cluster="k1"))
    for cluster, source in (("c1", "kafka"), ("c2", "kafka"), ("k1", "kubernetes")):
        state.apply_now(up.ClusterSynced(cluster, source))
    assert state.ready
    big = state.place(request("big", gpus=8, cluster="c1"))
    assert big.placements[0].cluster == "c1"
    assert state.place(request("q", gpus=4, cluster="c1")).result == "queued"
    state.readiness_changed.clear()
    # Down, but not yet for sync_lost_after_s (30 s by default): nothing changes.
    state.source_connection("kafka", "", False, "broker unreachable: KafkaConnectionError")
    clock.now_s += 29
    assert state.check_sources() == 0
    assert state.lost_clusters == frozenset()
    assert not state.readiness_changed.is_set()
    clock.now_s += 1
    assert state.check_sources() == 2  # every cluster of the Kafka source
    # The Kafka clusters leave placement; k1 is synced, so the daemon stays ready.
    assert state.lost_clusters == {"c1", "c2"}
    assert state.ready
    assert state.ready_event.is_set()
    assert state.readiness_changed.is_set()  # the per-cluster health changed
    assert state.health() == (True, (("c1", False), ("c2", False), ("k1", True)))
    assert state.source_reason("kafka", "c2") == (
        "sync lost 30 s ago: broker unreachable: KafkaConnectionError"
    )
    assert state.source_reason("kubernetes", "k1") == ""
    # Anywhere: lands on the synced cluster. Limited to a lost one: NotReady (UNAVAILABLE).
    anywhere = state.place(request("w", gpus=1))
    assert [(p.cluster, p.node) for p in anywhere.placements] == [("k1", "m0")]
    with pytest.raises(NotReady, match=r"cluster\(s\) 'c1' lost their sync.*kafka/c1: sync lost"):
        state.place(request("only-c1", gpus=1, cluster="c1"))
    with pytest.raises(NotReady, match="'c1'"):
        state.place(request("pool-c1", gpus=1, pool="p1", cluster="c1"))
    assert "only-c1" not in state.queue
    assert "only-c1" not in state.held
    # Explain says why, per node: c1's node is in a cluster whose telemetry is lost.
    decision, fits = state.explain(request("only-c1", gpus=1, cluster="c1"))
    assert not fits
    assert decision.explanation is not None
    assert ("CLUSTER_SYNC_LOST", 1, CLUSTER_SYNC_LOST_TEXT) in decision.explanation.reasons
    assert "1 node(s) in a cluster whose telemetry is lost" in decision.explanation.summary
    # A pending reservation on a lost cluster outlives its TTL until the cluster resyncs;
    # one on a synced cluster expires as usual.
    clock.now_s += 3600
    assert state.expire_due() == 1
    assert "big" in state.held
    assert "w" not in state.held
    # Capacity freed on the lost cluster is not used while it is lost ...
    state.release("big")
    assert "q" in state.queue
    # ... and is once the source is current again (the queue is retried).
    state.source_connection("kafka", "", True)
    assert state.lost_clusters == frozenset()
    assert state.health() == (True, (("c1", True), ("c2", True), ("k1", True)))
    assert [p.cluster for p in state.held["q"].record.pods] == ["c1"]
    assert state.place(request("only-c1", gpus=1, cluster="c1")).result == "placed"
    # Every source lost: not ready at all; Place is refused naming them.
    state.source_connection("kafka", "", False, "broker down")
    state.source_connection("kubernetes", "k1", False, "pods: MaxRetryError")
    clock.now_s += 31
    state.check_sources()
    assert not state.ready
    assert not state.ready_event.is_set()
    assert "kubernetes/k1: sync lost" in state.not_ready_reason()
    with pytest.raises(NotReady, match="kafka/c1: sync lost"):
        state.place(request("x", gpus=1))
    assert [s[2] for s in state.source_status()] == [False, False, False]
    # A relist (ClusterSynced) also ends a lost sync.
    state.apply_now(up.ClusterSynced("k1", "kubernetes"))
    assert state.ready
    assert state.lost_clusters == {"c1", "c2"}
    # A kube cluster down briefly and back before the bound never loses its sync.
    state.source_connection("kubernetes", "k1", False, "nodes: HTTP 503")
    state.source_connection("kubernetes", "k1", True)
    clock.now_s += 3600
    state.check_sources()
    assert state.lost_clusters == {"c1", "c2"}


def test_resync_keeps_per_node_staleness(tmp_path: Path, clock: FakeClock) -> None:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    state.expect_source("kubernetes", "k1")
    for name in ("n0", "n1"):
        state.apply_now(node(name, seq=1))
    state.apply_now(node("m0", seq=1, cluster="k1"))
    state.apply_now(up.ClusterSynced("c1", "kafka"))
    state.apply_now(up.ClusterSynced("k1", "kubernetes"))
    state.apply_now(up.NodeStale("c1", "n0", True))  # n0 stopped reporting
    state.source_connection("kafka", "", False, "broker down")
    clock.now_s += 60
    state.check_sources()
    assert state.lost_clusters == {"c1"}
    # A report that slips in while lost refreshes the node but does not unmask it.
    state.apply_now(node("n1", seq=2))
    state.apply_now(node("n2", seq=1))  # a new node of a lost cluster is masked too
    decision, _ = state.explain(request("c1", gpus=1, cluster="c1"))
    assert decision.explanation is not None
    assert {r[0]: r[1] for r in decision.explanation.reasons}["CLUSTER_SYNC_LOST"] == 3
    state.source_connection("kafka", "", True)
    # n1 and n2 are schedulable again; n0 stays stale until it reports.
    decision, _ = state.explain(request("c1", gpus=1, cluster="c1"))
    assert decision.result == "placed"
    placed = [state.place(request(f"w{i}", gpus=8, cluster="c1")) for i in range(3)]
    assert sorted(p.placements[0].node for p in placed[:2]) == ["n1", "n2"]
    assert placed[2].result == "queued"
    assert placed[2].explanation is not None
    assert {r[0] for r in placed[2].explanation.reasons} >= {"NODE_NOT_READY"}
    assert "CLUSTER_SYNC_LOST" not in {r[0] for r in placed[2].explanation.reasons}


def test_a_sources_progress_shows_in_its_reason_until_synced(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    assert state.source_reason("kafka", "c1") == "waiting for the initial sync"
    state.source_progress("kafka", "1,234 records to read")
    assert (
        state.source_reason("kafka", "c1") == "waiting for the initial sync: 1,234 records to read"
    )
    state.apply_now(node("n0", seq=1))
    state.apply_now(up.ClusterSynced("c1", "kafka"))
    assert state.source_reason("kafka", "c1") == ""
    state.source_progress("kafka", "5 records to read")  # (a synced cluster is not waiting)
    assert state.source_reason("kafka", "c1") == ""


def test_source_wide_sync_gates_readiness(tmp_path: Path, clock: FakeClock) -> None:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source_wide("kafka")
    assert not state.ready
    assert state.not_ready_reason() == "kafka/*: waiting for the initial sync"
    state.apply_now(node("n0", seq=1, cluster="seen"))
    state.apply_now(up.ClusterSynced("seen", "kafka"))
    assert not state.ready  # a cluster it saw is synced; the source's catch-up is not done
    state.source_synced("kafka")
    assert state.ready
    assert [(s[0], s[1], s[2]) for s in state.source_status()] == [
        ("kafka", "*", True),
        ("kafka", "seen", True),
    ]
    # A cluster the source reported nodes of, but no ClusterSynced yet: served by it alone.
    state.apply_now(node("n1", seq=1, cluster="unsynced"))
    # A broker outage covers the source-wide entry as well, and so every cluster only this
    # source reports.
    state.source_connection("kafka", "", False, "broker down")
    clock.now_s += 60
    assert state.check_sources() == 2
    assert state.lost_clusters == {"seen", "unsynced"}
    assert not state.ready
    state.source_connection("kafka", "", True)
    assert state.lost_clusters == frozenset()
    assert state.ready


def test_idempotent_and_conflict(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    first = state.place(request("w", gpus=2))
    again = state.place(request("w", gpus=2))
    assert again.replayed
    assert again.placements == first.placements
    assert again.seq == first.seq
    with pytest.raises(Conflict):
        state.place(request("w", gpus=3))
    assert sum(map(sum, gpu_usage(state))) == 2000


def test_confirm_when_pods_observed(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    d = state.place(request("w", gpus=1, n=2))
    for i, p in enumerate(d.placements):
        assert state.held["w"].record.state == "pending"
        state.apply_now(
            up.PodObserved(
                cluster=p.cluster, namespace="ns", name=p.pod_name, uid=f"u{i}", node=p.node,
                requests=up.Resources(cpu_millicores=1000, memory_bytes=GIB, gpus=1),
                labels=up.labels_of({WORKLOAD_LABEL: "w", POD_NAME_LABEL: p.pod_name}), sequence=1,
            )
        )  # fmt: skip
    assert state.held["w"].record.state == "confirmed"
    assert state.history[-1].kind == "confirm"
    # The observed pods do not double count: still 2 GPUs in use.
    assert sum(map(sum, gpu_usage(state))) == 2000
    # A confirmed reservation never expires; when its pods finish it ends.
    clock.now_s += 10_000
    assert state.expire_due() == 0
    state.apply_now(up.PodRemoved("c1", "ns", "w-0", "u0", d.placements[0].node, sequence=2))
    state.apply_now(up.PodRemoved("c1", "ns", "w-1", "u1", d.placements[1].node, sequence=2))
    assert "w" not in state.held
    assert sum(map(sum, gpu_usage(state))) == 0


def test_expiry_frees_and_retries_queue(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    assert state.place(request("big", gpus=8)).result == "placed"
    assert state.place(request("next", gpus=4)).result == "queued"
    clock.now_s += state.config.reservations.default_ttl_s - 1
    assert state.expire_due() == 0
    clock.now_s += 2
    assert state.expire_due() == 1
    kinds = [(d.kind, d.workload_id, d.result) for d in list(state.history)[-2:]]
    assert kinds == [("expire", "big", ""), ("place", "next", "placed")]
    assert sum(map(sum, gpu_usage(state))) == 4000


def test_restore_after_kill(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock)
    placed = {wid: state.place(request(wid, gpus=3)).placements for wid in ("a", "b", "c")}
    state.release("b")
    before = gpu_usage(state)
    # "kill -9": the old connection is never closed; a new process opens the same file.
    restarted = make_state(path, clock)
    assert set(restarted.held) == {"a", "c"}
    assert gpu_usage(restarted) == before
    assert restarted.place(request("a", gpus=3)).placements == placed["a"]
    assert restarted.seq == state.seq
    # New placements never land on the restored devices.
    for i in range(6):
        restarted.place(request(f"new{i}", gpus=1))
    assert max(max(g) for g in gpu_usage(restarted)) <= 1000
    assert sum(map(sum, gpu_usage(restarted))) == 6000 + 6000


def test_queue_survives_a_kill_in_order(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock, nodes=1)
    assert state.place(request("big", gpus=8)).result == "placed"
    for wid in ("q1", "q2", "q3"):
        assert state.place(request(wid, gpus=4)).result == "queued"
    state.release("q2")  # dropped from the queue, durably
    # "kill -9": the old connection is never closed; a new process opens the same file.
    restarted = make_state(path, clock, nodes=1)
    assert list(restarted.queue) == ["q1", "q3"]
    assert restarted.queue["q1"].request == request("q1", gpus=4)
    replay = restarted.place(request("q1", gpus=4))
    assert (replay.result, replay.replayed) == ("queued", True)
    with pytest.raises(Conflict):
        restarted.place(request("q1", gpus=2))
    # Capacity frees: both run, oldest first; placed ones leave the durable queue.
    restarted.release("big")
    assert set(restarted.held) == {"q1", "q3"}
    again = make_state(path, clock, nodes=1)
    assert not again.queue
    assert set(again.held) == {"q1", "q3"}


async def test_queue_retry_round_continues_on_later_loop_turns(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fleetd.state

    # Every slice of retry work is over budget at once: one placement per turn of the loop.
    monkeypatch.setattr(fleetd.state, "QUEUE_RETRY_BUDGET_S", 0.0)
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    state.place(request("big", gpus=8))
    for wid in ("q1", "q2", "q3"):
        assert state.place(request(wid, gpus=2)).result == "queued"
    state.release("big")
    assert set(state.held) == {"q1"}
    await asyncio.sleep(0)  # one turn of the loop: the round goes on
    assert set(state.held) == {"q1", "q2"}
    await asyncio.sleep(0)
    assert set(state.held) == {"q1", "q2", "q3"}
    assert not state.queue


async def test_a_caller_gone_before_its_batch_is_not_decided(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    gone = state.submit(request("gone", gpus=4))
    kept = state.submit(request("kept", gpus=4))
    gone.cancel()  # what grpc does to the handler when the call's deadline passes
    decision = await kept
    assert decision.result == "placed"
    assert set(state.held) == {"kept"}
    assert [d.workload_id for d in state.history] == ["kept"]


def test_restored_queue_waits_for_the_sync(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock, nodes=2)
    state.place(request("big0", gpus=8))
    state.place(request("big1", gpus=8))
    assert state.place(request("q", gpus=8, n=2)).result == "queued"  # a gang: 2 nodes
    restarted = FleetState(Config(), Journal(path), clock)
    restarted.expect_source("test", "c1")
    for i in range(4):  # the cluster grew while fleetd was down
        restarted.apply_now(node(f"n{i}", seq=1))
    assert "q" in restarted.queue  # not retried before every source synced
    restarted.apply_now(up.ClusterSynced("c1", "test"))
    assert set(restarted.held) == {"big0", "big1", "q"}
    assert not restarted.queue
    assert sum(map(sum, gpu_usage(restarted))) == 32 * 1000


def test_restore_skips_expired(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock)
    state.place(request("a", gpus=1))
    clock.now_s += 10_000
    restarted = make_state(path, clock)
    assert restarted.expire_due() == 1
    assert sum(map(sum, gpu_usage(restarted))) == 0


def test_stale_nodes_are_unschedulable(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    clock.now_s += state.config.staleness.node_stale_after_s + 1
    assert state.mark_stale() == 1
    d = state.place(request("w"))
    assert d.result == "queued"
    assert d.explanation is not None
    assert d.explanation.reasons[0][0] == "NODE_NOT_READY"
    state.apply_now(node("n0", seq=2))  # reports again
    assert state.mark_stale() == 0
    assert state.place(request("w2")).result == "placed"


def test_a_node_reported_silent_stays_stale_until_it_reports(
    tmp_path: Path, clock: FakeClock
) -> None:
    # (What the Kafka source says of a node whose last report in the topic was old when
    # fleetd started: the sweep alone would take the report as fresh.)
    state = make_state(tmp_path / "j.db", clock, nodes=2)
    state.apply_now(up.NodeStale("c1", "n0", True))
    for _ in range(3):
        assert state.mark_stale() == 1
        clock.now_s += 1
    assert state.place(request("w", gpus=8)).placements[0].node == "n1"
    assert state.place(request("w2", gpus=8)).result == "queued"  # not on n0
    state.apply_now(node("n0", seq=2))  # reports again
    assert state.mark_stale() == 0
    assert state.place(request("w3", gpus=8)).placements[0].node == "n0"


def test_redelivered_updates_are_ignored(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    assert state.apply_now(node("n0", seq=5, gpus=4))
    assert not state.apply_now(node("n0", seq=5, gpus=8))
    assert not state.apply_now(node("n0", seq=3, gpus=8))
    assert int(state.fleet.gpu_count[state.fleet.slot("c1/n0")]) == 4
    assert state.ignored_updates == 2


def test_node_removed_ends_its_reservations(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    state.place(request("w", gpus=2))
    state.apply_now(up.NodeRemoved("c1", "n0", sequence=9))
    assert "w" not in state.held
    assert state.history[-1].kind == "expire"
    state.apply_now(node("n1", seq=1))  # reuses the row: starts empty
    assert sum(map(sum, gpu_usage(state))) == 0


def test_unknown_scope_and_release(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    with pytest.raises(NotFound, match="cluster"):
        state.place(request("w", cluster="nope"))
    with pytest.raises(NotFound, match="pool"):
        state.place(request("w", pool="nope"))
    with pytest.raises(NotFound):
        state.release("never")


def test_mutation_off_the_owner_thread_raises(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    errors: list[BaseException] = []

    def off_thread() -> None:
        try:
            state.place(request("w"))
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=off_thread)
    t.start()
    t.join()
    assert len(errors) == 1
    assert "owner thread" in str(errors[0])


def test_heartbeat_only_refreshes_but_changes_apply(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    state.place(request("w", gpus=2))
    clock.now_s += 50
    assert state.apply_now(node("n0", seq=2))  # same content: a heartbeat
    assert state.nodes["c1/n0"].last_seen_s == clock.now_s
    assert sum(map(sum, gpu_usage(state))) == 2000
    assert state.apply_now(node("n0", seq=3, gpus=4))  # a real change applies, usage kept
    assert int(state.fleet.gpu_count[state.fleet.slot("c1/n0")]) == 4
    assert sum(map(sum, gpu_usage(state))) == 2000
    state.apply_now(node("n0", seq=4, gpus=4, unschedulable=True))  # cordon
    assert state.place(request("x")).result == "queued"


def test_fgd_learns_its_target_workload_from_requests(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    assert state.config.scheduling.policy == "fgd-plus"
    # No request yet: nothing to measure fragmentation against, the core's default packs.
    assert "fgd" not in state.policy.name
    d1 = state.place(request("a", gpus=0, milli=500))
    assert "fgd-plus" in state.policy.name
    typical = state.target.typical(state.fleet)
    assert typical is not None
    assert (typical.gpu_milli.tolist(), typical.num_gpu.tolist()) == ([500], [1])
    # Explain uses the policy Place would use: both agree on where the next pod goes.
    d2, fits = state.explain(request("b", gpus=0, milli=500))
    assert fits
    assert state.place(request("b", gpus=0, milli=500)).placements == d2.placements
    assert d1.placements[0].node == d2.placements[0].node  # FGD packs the share next to it


def test_policy_reload_switches_plugins(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    cfg = state.config.model_copy(
        update={"scheduling": state.config.scheduling.model_copy(update={"policy": "best-fit"})}
    )
    state.set_config(cfg)
    assert state.policy.name == "best-fit:1"


def test_queue_is_bounded(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    limits = state.config.limits.model_copy(update={"max_queued_workloads": 2})
    state.set_config(state.config.model_copy(update={"limits": limits}))
    assert state.place(request("fill", gpus=8)).result == "placed"
    assert state.place(request("q1", gpus=8)).result == "queued"
    assert state.place(request("q2", gpus=8)).result == "queued"
    seq = state.seq
    with pytest.raises(QueueFull):
        state.place(request("q3", gpus=8))
    assert state.seq == seq  # a refused request makes no decision
    assert state.place(request("q1", gpus=8)).result == "queued"  # a retry of a queued one is fine


def test_pod_seen_before_its_node_holds_resources_once_the_node_appears(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=0)
    req = up.Resources(cpu_millicores=1000, memory_bytes=GIB, gpus=3)
    state.apply_now(up.PodObserved("c1", "ns", "early", "u1", "late-node", req, sequence=1))
    state.apply_now(node("late-node", seq=1))
    assert sum(map(sum, gpu_usage(state))) == 3000
    # A finished pod frees what it held.
    state.apply_now(
        up.PodObserved("c1", "ns", "early", "u1", "late-node", req, phase="Succeeded", sequence=2)
    )
    assert sum(map(sum, gpu_usage(state))) == 0


def test_place_batch_answers_each_request(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock, nodes=1)
    state.place(request("held", gpus=2))
    reqs = [
        request("a", gpus=2),
        request("held", gpus=2),  # replay
        request("held", gpus=5),  # conflict
        request("b", gpus=2, n=2),  # a gang: 4 GPUs, all or nothing
        request("a", gpus=2),  # the same id twice in one batch: a replay of the first
        request("c", cluster="nowhere"),
        request("d", gpus=8),  # no room left: queued
    ]
    results = state.place_batch(reqs)
    kinds = [r.result if not isinstance(r, Exception) else type(r).__name__ for r in results]
    assert kinds == ["placed", "placed", "Conflict", "placed", "placed", "NotFound", "queued"]
    a, replay = results[0], results[4]
    assert not isinstance(a, Exception)
    assert not isinstance(replay, Exception)
    assert replay.replayed
    assert replay.placements == a.placements
    assert sum(map(sum, gpu_usage(state))) == 8000
    assert set(state.held) == {"held", "a", "b"}


async def test_concurrent_submits_share_one_batch(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    sizes: list[int] = []
    original = state.place_batch

    def spy(reqs: list[WorkloadRequest]) -> list[object]:
        sizes.append(len(reqs))
        return original(reqs)  # type: ignore[return-value]

    state.place_batch = spy  # type: ignore[assignment,method-assign]
    decisions = await asyncio.gather(*(state.submit(request(f"w{i}")) for i in range(20)))
    assert sizes == [20]
    assert [d.result for d in decisions] == ["placed"] * 16 + ["queued"] * 4
    assert max(max(g) for g in gpu_usage(state)) <= 1000


async def test_decisions_survive_a_restart_for_resume(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock)
    for i in range(4):
        state.place(request(f"w{i}", gpus=2))
    state.release("w1")
    state.place(request("big", gpus=16))  # unschedulable: a decision without a reservation
    before = list(state.history)
    restarted = make_state(path, clock)  # the old connection was never closed ("kill -9")
    assert list(restarted.history) == before
    stream = restarted.watch(after_seq=3)
    got = [await anext(stream) for _ in range(3)]
    assert [(d.kind, d.workload_id) for d in got] == [
        ("place", "w3"), ("release", "w1"), ("place", "big"),
    ]  # fmt: skip
    assert got[2].explanation is not None
    assert got[2].explanation.reasons == before[-1].explanation.reasons  # type: ignore[union-attr]
    await stream.aclose()


async def test_watch_out_of_range_and_slow_watchers(tmp_path: Path, clock: FakeClock) -> None:
    state = make_state(tmp_path / "j.db", clock)
    limits = state.config.limits.model_copy(update={"decision_history": 100})
    server = state.config.server.model_copy(update={"max_stream_backlog": 16})
    state.set_config(state.config.model_copy(update={"limits": limits, "server": server}))
    for i in range(150):
        state.place(request(f"w{i}", gpus=0, milli=100))
    with pytest.raises(OutOfRange, match="oldest retained seq is 51"):
        await anext(state.watch(after_seq=10))
    # A watcher that stops reading is cut off once 16 decisions wait for it; what it did not
    # read is dropped (it resumes from the last seq it saw).
    slow = state.watch(after_seq=0, from_now=True)
    first = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)  # let it subscribe
    for i in range(20):
        state.release(f"w{i}")

    async def drain() -> None:
        await first
        for _ in range(40):
            await anext(slow)

    with pytest.raises(OutOfRange, match="fell behind"):
        await drain()


def test_restored_reservation_on_a_vanished_node_ends_at_sync(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "j.db"
    state = make_state(path, clock)
    d = state.place(request("w", gpus=2))
    node_name = d.placements[0].node
    restarted = FleetState(Config(), Journal(path), clock)
    restarted.expect_source("test", "c1")
    survivors = [n for n in ("n0", "n1") if n != node_name]
    for n in survivors:
        restarted.apply_now(node(n, seq=1))
    restarted.apply_now(up.ClusterSynced("c1", "test", frozenset(survivors)))
    assert "w" not in restarted.held
    assert restarted.history[-1].kind == "expire"
    assert sum(map(sum, gpu_usage(restarted))) == 0


def test_a_workload_whose_constraints_allow_only_lost_clusters_is_unavailable(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Limited by its selector or GPU models rather than by `cluster`/`pool`: the same
    UNAVAILABLE as a workload named to the lost cluster, not a silent QUEUED."""
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    state.expect_source("kubernetes", "k1")
    state.apply_now(node("n0", seq=1, labels=(("team", "x"),)))
    state.apply_now(node("n1", seq=1, model="H100"))
    state.apply_now(node("m0", seq=1, cluster="k1"))
    for cluster, source in (("c1", "kafka"), ("k1", "kubernetes")):
        state.apply_now(up.ClusterSynced(cluster, source))
    state.source_connection("kafka", "", False, "broker unreachable")
    clock.now_s += 30
    state.check_sources()
    assert state.lost_clusters == {"c1"}

    def pods(**kw: object) -> tuple[PodRequest, ...]:
        return (PodRequest(name="p", cpu_millicores=1000, memory_bytes=GIB, gpu_count=1, **kw),)  # type: ignore[arg-type]

    team_x = WorkloadRequest(
        "team-x", "ml", 0, pods(node_selector=(("team", "x"),)), fingerprint="x"
    )
    with pytest.raises(NotReady, match=r"cluster\(s\) 'c1' lost their sync"):
        state.place(team_x)
    h100 = WorkloadRequest("h100", "ml", 0, pods(gpu_models=("H100",)), fingerprint="h")
    with pytest.raises(NotReady, match="'c1'"):
        state.place(h100)
    assert "team-x" not in state.queue
    assert "h100" not in state.queue
    # Allowed somewhere synced: placed there; allowed nowhere: not a sync problem.
    a100 = WorkloadRequest("a100", "ml", 0, pods(gpu_models=("A100",)), fingerprint="a")
    assert [p.cluster for p in state.place(a100).placements] == ["k1"]
    nowhere = WorkloadRequest(
        "nowhere", "ml", 0, pods(node_selector=(("team", "y"),)), fingerprint="n"
    )
    assert state.place(nowhere).result in ("queued", "unschedulable")
    # Resynced: the selector-limited workload is placed on its cluster.
    state.source_connection("kafka", "", True)
    assert [p.node for p in state.place(team_x).placements] == ["n0"]
