"""Team GPU quotas: `teams.quotas` validation, the ledger's arithmetic, and the state's
enforcement on its serialized path (batches, the queue retry, reload, restore)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd import config
from fleetd.config import Config, TeamQuota
from fleetd.engine import PodRequest
from fleetd.journal import Journal
from fleetd.quota import QUOTA_REASON, QuotaLedger, Verdict, gpus_text
from fleetd.sources import updates as up
from fleetd.state import FleetState, StateError, WorkloadRequest, request_gpu_milli
from tests.unit.test_state import FakeClock, node

GIB = 1024**3


# -- config -------------------------------------------------------------------------------------


def test_quotas_load_with_fractions_and_models(tmp_path: Path) -> None:
    path = tmp_path / "fleetd.yaml"
    path.write_text(
        "teams:\n  quotas:\n    research: {gpus: 512}\n"
        "    batch: {gpus: 64.5, gpus_by_model: {H100-80GB: 16}}\n"
        "    infer: {gpus_by_model: {T4: 2.25}}\n"
    )
    quotas = config.load(path).teams.quotas
    assert quotas["research"] == TeamQuota(gpus=512)
    assert quotas["batch"].gpus == 64.5
    assert quotas["batch"].gpus_by_model == {"H100-80GB": 16}
    assert quotas["infer"].gpus is None  # no cap on the total, only on T4
    assert config.gpu_milli(quotas["infer"].gpus_by_model["T4"]) == 2250


@pytest.mark.parametrize(
    ("quotas", "field"),
    [
        pytest.param("{research: {gpus: -1}}", "teams.quotas.research.gpus", id="negative"),
        pytest.param("{research: {gpu: 4}}", "teams.quotas.research.gpu", id="unknown-key"),
        pytest.param("{research: {gpus: 0.0005}}", "teams.quotas.research.gpus", id="sub-milli"),
        pytest.param("{research: {gpus: true}}", "teams.quotas.research.gpus", id="boolean"),
        pytest.param("{research: {gpus: .inf}}", "teams.quotas.research.gpus", id="infinite"),
        pytest.param("{research: {gpus: lots}}", "teams.quotas.research.gpus", id="not-a-number"),
        pytest.param("{research: 512}", "teams.quotas.research", id="not-a-mapping"),
        pytest.param("{research: {}}", "teams.quotas.research", id="empty"),
        pytest.param("[research]", "teams.quotas", id="a-list"),
        pytest.param("{'bad team!': {gpus: 1}}", "teams.quotas", id="team-name"),
        pytest.param(
            "{research: {gpus_by_model: {H100: -2}}}",
            "teams.quotas.research.gpus_by_model.H100",
            id="negative-model",
        ),
        pytest.param(
            "{research: {gpus_by_model: {'bad model!': 2}}}",
            "teams.quotas.research.gpus_by_model",
            id="model-name",
        ),
    ],
)
def test_bad_quota_names_the_field(tmp_path: Path, quotas: str, field: str) -> None:
    path = tmp_path / "fleetd.yaml"
    path.write_text(f"teams:\n  quotas: {quotas}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)


# -- the ledger's arithmetic -----------------------------------------------------------------


def test_gpus_text() -> None:
    assert [gpus_text(m) for m in (0, 500, 1000, 16000, 12250)] == ["0", "0.5", "1", "16", "12.25"]


@pytest.mark.parametrize(
    ("held", "need", "models", "expected"),
    [
        # quota: 8 GPUs in total, 4 of them H100. Usage: `held` (model, milli).
        # 4 + 4 = 8 in total, 0 + 4 = 4 on H100
        pytest.param([("A100", 4000)], 4000, None, Verdict(True), id="exactly-the-quota"),
        pytest.param(
            [],
            9000,
            None,
            Verdict(False, never=True, text="team t: quota 8 GPUs, needs 9"),
            id="more-than-the-quota-itself",
        ),
        pytest.param(
            [("A100", 7500)],
            1000,
            None,
            # 7.5 + 1 > 8
            Verdict(False, text="team t: quota 8 GPUs, holds 7.5, needs 1"),
            id="over-the-total",
        ),
        pytest.param([("A100", 7500)], 500, None, Verdict(True), id="a-half-fits"),
        pytest.param(
            [("H100", 3000)],
            2000,
            None,
            # 3 + 2 > 4 H100: any other model will do
            Verdict(True, frozenset({"H100"}), text="team t: quota 4 H100 GPUs, holds 3, needs 2"),
            id="model-full-others-allowed",
        ),
        pytest.param(
            [("H100", 3000)],
            2000,
            frozenset({"H100"}),
            Verdict(False, text="team t: quota 4 H100 GPUs, holds 3, needs 2"),
            id="only-h100-waits",
        ),
        pytest.param(
            [],
            5000,
            frozenset({"H100"}),
            Verdict(False, never=True, text="team t: quota 4 H100 GPUs, needs 5"),
            id="only-h100-never",
        ),
        pytest.param(
            [("A100", 7000)],
            5000,
            frozenset({"H100"}),
            # over the total too, but more than H100's quota itself: never
            Verdict(False, never=True, text="team t: quota 4 H100 GPUs, needs 5"),
            id="never-wins-over-waiting",
        ),
        pytest.param([("H100", 3000)], 1000, frozenset({"H100", "A100"}), Verdict(True), id="fits"),
        pytest.param([("H100", 8000)], 0, None, Verdict(True), id="cpu-only-is-free"),
    ],
)
def test_check(
    held: list[tuple[str, int]], need: int, models: frozenset[str] | None, expected: Verdict
) -> None:
    ledger = QuotaLedger()
    ledger.charge("t", held)
    quota = TeamQuota(gpus=8, gpus_by_model={"H100": 4})
    pods = [(models, need)] if need else []
    assert ledger.check("t", quota, pods) == expected
    assert ledger.check("t", None, pods) == Verdict(True)  # no quota, no cap


def test_check_charges_a_model_with_the_pods_that_may_use_it() -> None:
    ledger = QuotaLedger()
    ledger.charge("t", [("H100", 3000)])
    quota = TeamQuota(gpus_by_model={"H100": 4})
    h100, a100 = frozenset({"H100"}), frozenset({"A100"})
    # 3 held + 1 (the H100 pod; the A100 pod cannot go there) = 4: allowed
    assert ledger.check("t", quota, [(a100, 2000), (h100, 1000)]) == Verdict(True)
    # Two H100-only pods of 3 and 2: 5 > 4 however long they wait
    assert ledger.check("t", quota, [(h100, 3000), (h100, 2000)]) == Verdict(
        False, never=True, text="team t: quota 4 H100 GPUs, needs 5"
    )
    # A pod free to go anywhere and an H100-only one: H100 has room for the H100-only pod
    # (3 + 1 = 4), not for both (3 + 2 > 4): the free one is kept off H100.
    assert ledger.check("t", quota, [(None, 1000), (h100, 1000)]) == Verdict(
        True, frozenset({"H100"}), text="team t: quota 4 H100 GPUs, holds 3, needs 2"
    )
    # Not even for the H100-only pod (3 + 2 > 4): it waits.
    assert ledger.check("t", quota, [(None, 1000), (h100, 2000)]) == Verdict(
        False, text="team t: quota 4 H100 GPUs, holds 3, needs 2"
    )


def test_a_lowered_quota_below_usage_holds_back_only_new_work() -> None:
    ledger = QuotaLedger()
    ledger.charge("t", [("H100", 6000)])
    quota = TeamQuota(gpus_by_model={"H100": 4})
    assert ledger.check("t", quota, [(None, 1000)]) == Verdict(
        True, frozenset({"H100"}), text="team t: quota 4 H100 GPUs, holds 6, needs 1"
    )
    assert ledger.check("t", quota, [(frozenset({"A100"}), 1000)]) == Verdict(True)


def test_check_counts_the_batch_so_far() -> None:
    ledger = QuotaLedger()
    ledger.charge("t", [("A100", 2000)])
    quota = TeamQuota(gpus=4)
    assert ledger.check("t", quota, [(None, 2000)]).allowed
    assert not ledger.check("t", quota, [(None, 2000)], extra={"": 1000}).allowed


def test_charge_and_credit_are_inverses() -> None:
    ledger = QuotaLedger()
    ledger.charge("t", [("A100", 1000), ("H100", 500), ("", 0)])
    ledger.charge("t", [("A100", 2000)])
    assert (ledger.held_milli("t"), ledger.held_milli("t", "A100")) == (3500, 3000)
    ledger.credit("t", [("A100", 2000)])
    ledger.credit("t", [("A100", 1000), ("H100", 500)])
    assert ledger.usage == {}


def test_admits_checks_the_models_a_placement_landed_on() -> None:
    ledger = QuotaLedger()
    ledger.charge("t", [("H100", 3000)])
    quota = TeamQuota(gpus_by_model={"H100": 4})
    assert ledger.admits("t", quota, [("H100", 1000), ("A100", 8000)]) == ""
    assert ledger.admits("t", quota, [("H100", 2000)]) == (
        "team t: quota 4 H100 GPUs, holds 3, needs 2"
    )


# -- enforcement in the state ---------------------------------------------------------------


def quota_config(**quotas: Any) -> Config:
    """A config with `teams.quotas` = `quotas` (validated as a file's would be)."""
    return Config.model_validate({"teams": {"quotas": quotas}})


def make_state(path: Path, cfg: Config, models: tuple[str, ...] = ("A100", "A100")) -> FleetState:
    state = FleetState(cfg, Journal(path), FakeClock())
    state.expect_source("test", "c1")
    for i, model in enumerate(models):
        state.apply_now(node(f"n{i}", seq=1, model=model))
    state.apply_now(up.ClusterSynced("c1", "test"))
    return state


def req(
    wid: str, team: str = "research", gpus: int = 1, milli: int = 0, models: tuple[str, ...] = ()
) -> WorkloadRequest:
    pod = PodRequest(f"{wid}-0", 1000, GIB, gpu_count=gpus, gpu_milli=milli, gpu_models=models)
    return WorkloadRequest(wid, team, 0, (pod,), fingerprint=f"{wid}:{gpus}:{milli}:{models}")


def test_over_quota_queues_and_a_release_places_it(tmp_path: Path) -> None:
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 4}))
    assert state.place(req("a", gpus=3)).result == "placed"
    waiting = state.place(req("b", gpus=2))
    assert waiting.result == "queued"
    assert waiting.explanation is not None
    assert waiting.explanation.reasons == (
        (QUOTA_REASON, 0, "team research: quota 4 GPUs, holds 3, needs 2"),
    )
    assert state.place(req("other", team="batch", gpus=8)).result == "placed"  # not capped
    assert state.release("a").kind == "release"
    assert "b" in state.held
    assert state.quotas.held_milli("research") == 2000


def test_more_than_the_quota_itself_is_unschedulable(tmp_path: Path) -> None:
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 4}))
    d = state.place(req("big", gpus=5))
    assert (d.result, "big" in state.queue) == ("unschedulable", False)
    assert d.explanation is not None
    assert d.explanation.summary == "team research: quota 4 GPUs, needs 5."


def test_one_batch_never_exceeds_the_quota(tmp_path: Path) -> None:
    # 2.5 GPUs for the team: a batch of 10 half-GPU pods places 5 of them.
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 2.5}))
    results = state.place_batch([req(f"h{i}", gpus=0, milli=500) for i in range(10)])
    assert [r.result for r in results if not isinstance(r, Exception)] == ["placed"] * 5 + [
        "queued"
    ] * 5
    assert state.quotas.held_milli("research") == 2500


def test_a_batch_rechecks_what_its_tally_held_back(tmp_path: Path) -> None:
    # One 4-GPU node, 2 GPUs held by another team. research may hold 3: "wide" (3 GPUs,
    # tallied first) does not fit now, so "small", held back by the tally, is placed once
    # the batch's grants are known.
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 3}), models=())
    state.apply_now(node("n0", seq=1, gpus=4, model="A100"))
    assert state.place(req("other", team="batch", gpus=2)).result == "placed"
    [w, s] = state.place_batch([req("wide", gpus=3), req("small", gpus=1)])
    assert not isinstance(w, Exception)
    assert not isinstance(s, Exception)
    assert (w.result, s.result) == ("queued", "placed")


def test_a_full_model_sends_work_to_another_model(tmp_path: Path) -> None:
    cfg = quota_config(research={"gpus_by_model": {"H100": 8}})
    state = make_state(tmp_path / "j.db", cfg, models=("H100", "A100"))
    first = state.place(req("first", gpus=8, models=("H100",)))
    assert first.placements[0].gpu_model == "H100"
    second = state.place(req("second", gpus=4))  # any model: the quota keeps it off H100
    assert [p.gpu_model for p in second.placements] == ["A100"]
    only_h100 = state.place(req("third", gpus=1, models=("H100",)))
    assert only_h100.result == "queued"
    assert state.quotas.held_milli("research", "H100") == 8000


def test_one_batch_never_exceeds_a_model_quota(tmp_path: Path) -> None:
    # H100 capped at 2 for the team, plenty of H100 room: 6 one-GPU pods that may use any
    # model: at most 2 on H100, the rest elsewhere.
    cfg = quota_config(research={"gpus_by_model": {"H100": 2}})
    state = make_state(tmp_path / "j.db", cfg, models=("H100", "A100"))
    results = state.place_batch([req(f"p{i}") for i in range(6)])
    assert all(not isinstance(r, Exception) and r.result == "placed" for r in results)
    assert state.quotas.held_milli("research", "H100") <= 2000
    assert state.quotas.held_milli("research") == 6000


def test_retry_skips_over_quota_heads_without_blocking_other_teams(tmp_path: Path) -> None:
    # One 8-GPU node. research (quota 2) holds 2; 40 more research workloads queue behind
    # its quota, then a batch workload queues for capacity. Freeing capacity places the
    # batch workload although 40 over-quota research workloads are ahead of it.
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 2}), models=("A100",))
    assert state.place(req("r0", gpus=2)).result == "placed"
    for i in range(40):
        assert state.place(req(f"r{i + 1}", gpus=1)).result == "queued"
    assert state.place(req("fill", team="batch", gpus=6)).result == "placed"
    assert state.place(req("b", team="batch", gpus=4)).result == "queued"
    state.release("fill")
    assert "b" in state.held
    assert len(state.queue) == 40


def test_raising_the_quota_places_the_queue_and_lowering_evicts_nothing(tmp_path: Path) -> None:
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 2}))
    assert state.place(req("a", gpus=2)).result == "placed"
    assert state.place(req("b", gpus=2)).result == "queued"
    state.set_config(quota_config(research={"gpus": 4}))
    assert set(state.held) == {"a", "b"}
    state.set_config(quota_config(research={"gpus": 1}))
    assert set(state.held) == {"a", "b"}  # above the quota now: nothing is evicted
    assert state.place(req("c", gpus=0, milli=100)).result == "queued"
    assert state.team_usage() == [("research", "", 4000, 1000), ("research", "A100", 4000, None)]


def test_usage_comes_back_from_the_journal(tmp_path: Path) -> None:
    cfg = quota_config(research={"gpus": 4, "gpus_by_model": {"A100": 3}})
    state = make_state(tmp_path / "j.db", cfg)
    state.place(req("a", gpus=2))
    state.place(req("b", gpus=0, milli=500))
    # "Kill": a new state on the same file (the old connection never closed).
    again = FleetState(cfg, Journal(tmp_path / "j.db"), FakeClock())
    assert again.quotas.held_milli("research") == 2500
    assert again.quotas.held_milli("research", "A100") == 2500
    assert again.team_usage() == [("research", "", 2500, 4000), ("research", "A100", 2500, 3000)]


def test_expiry_gives_the_quota_back(tmp_path: Path) -> None:
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 2}))
    state.place(req("a", gpus=2))
    assert state.place(req("b", gpus=1)).result == "queued"
    assert isinstance(state.clock, FakeClock)
    state.clock.now_s += state.config.reservations.default_ttl_s + 1
    state.expire_due()
    assert set(state.held) == {"b"}


def test_explain_reports_the_quota(tmp_path: Path) -> None:
    state = make_state(tmp_path / "j.db", quota_config(research={"gpus": 2}))
    state.place(req("a", gpus=2))
    decision, fits = state.explain(req("b", gpus=1))
    assert (decision.result, fits) == ("queued", False)
    assert decision.explanation is not None
    assert decision.explanation.summary == (
        "team research: quota 2 GPUs, holds 2, needs 1. The fleet has room for it now."
    )
    assert decision.explanation.nodes_feasible == 2


def test_request_gpu_milli() -> None:
    assert request_gpu_milli(req("w", gpus=3)) == 3000
    assert request_gpu_milli(req("w", gpus=0, milli=250)) == 250


def test_a_gangs_pods_keep_their_own_models(tmp_path: Path) -> None:
    # H100 full for the team (1 of 1 held): each GPU pod of a gang loses H100 from its own
    # choices; a CPU-only pod is not touched; a pod left with no model makes it wait.
    cfg = quota_config(research={"gpus_by_model": {"H100": 1}})
    state = make_state(tmp_path / "j.db", cfg, models=("H100", "A100"))
    assert state.place(req("h", gpus=1, models=("H100",))).result == "placed"

    def gang(wid: str, *pods: PodRequest) -> WorkloadRequest:
        return WorkloadRequest(wid, "research", 0, pods, gang=True, fingerprint=wid)

    cpu = PodRequest("cpu", 1000, GIB)
    anywhere = PodRequest("any", 1000, GIB, gpu_count=1)
    placed = state.place(gang("g1", cpu, anywhere))
    assert placed.result == "placed"
    assert [p.gpu_model for p in placed.placements] == ["", "A100"]
    a100 = PodRequest("a", 1000, GIB, gpu_count=1, gpu_models=("A100",))
    h100 = PodRequest("b", 1000, GIB, gpu_count=1, gpu_models=("H100",))
    waiting = state.place(gang("g2", a100, h100))
    assert waiting.result == "queued"
    assert waiting.explanation is not None
    # (only the pod that may use H100 counts against H100's quota)
    assert waiting.explanation.summary == "team research: quota 1 H100 GPUs, holds 1, needs 1."


# -- property: the quota holds whatever arrives -------------------------------------------------

quota_op = st.one_of(
    st.tuples(st.just("place"), st.sampled_from(["research", "batch", "free"]),
              st.sampled_from([0, 1, 2, 4]), st.sampled_from([0, 250, 500]),
              st.sampled_from([(), ("A100",), ("H100",), ("A100", "H100")]), st.integers(1, 3)),
    st.tuples(st.just("batch"), st.integers(2, 12)),
    st.tuples(st.just("release"), st.integers(0, 40)),
    st.tuples(st.just("expire"), st.integers(1, 400)),
)  # fmt: skip

QUOTAS = {"research": {"gpus": 6, "gpus_by_model": {"H100": 2.5}}, "batch": {"gpus": 3.25}}


def held_by_team(state: FleetState) -> dict[tuple[str, str], int]:
    """(team, model or '') -> GPU milli, recomputed from the held reservations."""
    out: dict[tuple[str, str], int] = {}
    for held in state.held.values():
        for p in held.record.pods:
            milli = p.gpu_milli * len(p.gpu_indices)
            for key in ((held.record.team, ""), (held.record.team, p.gpu_model)):
                out[key] = out.get(key, 0) + milli
    return {k: v for k, v in out.items() if v}


@settings(max_examples=30, deadline=None)
@given(st.lists(quota_op, min_size=1, max_size=30))
def test_usage_never_exceeds_a_quota_and_matches_the_reservations(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        clock = FakeClock()
        state = FleetState(quota_config(**QUOTAS), Journal(Path(tmp) / "j.db"), clock)
        state.expect_source("test", "c1")
        for i, model in enumerate(("H100", "A100", "A100")):
            state.apply_now(node(f"n{i}", seq=1, gpus=4, model=model))
        state.apply_now(up.ClusterSynced("c1", "test"))
        made: list[WorkloadRequest] = []
        for n, op in enumerate(ops):
            if op[0] in ("place", "batch"):
                if op[0] == "place":
                    _, team, gpus, milli, models, pods = op
                    reqs = [gang_request(f"w{n}", team, gpus, milli, models, pods)]
                else:  # a burst of one team's Places: one batch
                    reqs = [req(f"w{n}-{i}", gpus=1 + i % 2) for i in range(op[1])]
                made += reqs
                for r in state.place_batch(reqs):
                    assert not isinstance(r, Exception) or isinstance(r, StateError)
            elif op[0] == "release" and made:
                with contextlib.suppress(StateError):
                    state.release(made[op[1] % len(made)].workload_id)
            elif op[0] == "expire":
                clock.now_s += op[1]
                state.expire_due()
            usage = held_by_team(state)
            ledger = {(team, model): milli for team, model, milli, _ in state.team_usage() if milli}
            assert ledger == usage
            assert usage.get(("research", ""), 0) <= 6000
            assert usage.get(("research", "H100"), 0) <= 2500
            assert usage.get(("batch", ""), 0) <= 3250
        # A restart from the journal has the same usage.
        again = FleetState(quota_config(**QUOTAS), Journal(Path(tmp) / "j.db"), clock)
        assert {(t, m): h for t, m, h, _ in again.team_usage() if h} == held_by_team(state)


def gang_request(
    wid: str, team: str, gpus: int, milli: int, models: tuple[str, ...], n: int
) -> WorkloadRequest:
    if gpus:
        milli = 0
    pods = tuple(
        PodRequest(f"{wid}-{i}", 1000, GIB, gpu_count=gpus, gpu_milli=milli, gpu_models=models)
        for i in range(n)
    )
    return WorkloadRequest(wid, team, 0, pods, gang=n > 1, fingerprint=wid)
