"""Per-team GPU quotas: the arithmetic of `teams.quotas` (no I/O, no clock).

A team's usage is the GPUs its held reservations hold (pending or confirmed, until released,
expired or ended), in milli-GPU (a whole GPU is 1000, a 0.5-GPU share 500), in total and per
GPU model. `FleetState` keeps one `QuotaLedger` on its single serialized path: it charges
a reservation when it is granted (or restored from the journal) and credits it when it ends,
and asks `check` before it places a workload and `admits` before it commits one.

Like a Kueue ClusterQueue's nominal quota without borrowing: a workload that would take its
team over the quota waits (QUEUED) even when the fleet has room; one that needs more than
the quota itself can never be placed (UNSCHEDULABLE). Lowering a quota evicts nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fleetd.config import TeamQuota, gpu_milli

#: The reason code of a workload held back by its team's quota (Explanation.reasons).
QUOTA_REASON = "TEAM_QUOTA"


def gpus_text(milli: int) -> str:
    """Milli-GPU as GPUs for a person: 512, 0.5, 12.25."""
    whole, frac = divmod(milli, 1000)
    return str(whole) if not frac else f"{milli / 1000:g}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a team's quota says of one workload.

    `allowed`: it may be placed, on any GPU model but those in `exclude_models` (models
    whose own quota it would exceed). Otherwise `never` tells UNSCHEDULABLE (it needs more
    than the quota itself) from QUEUED (it waits for the team's usage to drop), and `text`
    names the quota ("team research: quota 512 GPUs, holds 500, needs 16").
    """

    allowed: bool
    exclude_models: frozenset[str] = frozenset()
    never: bool = False
    text: str = ""


ALLOWED = Verdict(True)


@dataclass(slots=True)
class TeamUsage:
    """GPU milli held by one team's reservations, in total and per GPU model."""

    total_milli: int = 0
    by_model_milli: collections.Counter[str] = field(default_factory=collections.Counter)


class QuotaLedger:
    """Usage by team, changed only by `charge` and `credit` (exact inverses)."""

    def __init__(self) -> None:
        """An empty ledger (nobody holds anything)."""
        self.usage: dict[str, TeamUsage] = {}

    def charge(self, team: str, held: Iterable[tuple[str, int]]) -> None:
        """Add the (gpu_model, gpu_milli) pairs of a granted reservation to `team`'s usage."""
        usage = self.usage.setdefault(team, TeamUsage())
        for model, milli in held:
            if milli:
                usage.total_milli += milli
                usage.by_model_milli[model] += milli

    def credit(self, team: str, held: Iterable[tuple[str, int]]) -> None:
        """Remove what `charge` added for the same pairs (a reservation ended)."""
        usage = self.usage.get(team)
        if usage is None:
            return
        for model, milli in held:
            if milli:
                usage.total_milli -= milli
                usage.by_model_milli[model] -= milli
                if not usage.by_model_milli[model]:
                    del usage.by_model_milli[model]
        if not usage.total_milli and not usage.by_model_milli:
            del self.usage[team]

    def held_milli(self, team: str, model: str = "") -> int:
        """`team`'s usage: in total, or of one GPU model."""
        usage = self.usage.get(team)
        if usage is None:
            return 0
        return usage.by_model_milli.get(model, 0) if model else usage.total_milli

    def check(
        self,
        team: str,
        quota: TeamQuota | None,
        pods: Sequence[tuple[frozenset[str] | None, int]],
        extra: Mapping[str, int] | None = None,
    ) -> Verdict:
        """May `team` place a workload whose GPU pods are `pods`: (the GPU models each may
        use, None = any; its GPU milli)? `extra`: milli already promised in this batch, by
        model ("" = the total), counted as held. Checks, never changes the ledger.

        The model a pod lands on is known only once it is placed, so a model's quota is
        checked against every pod that may use it: if they would not all fit, the pods
        that may go elsewhere are kept off it (`exclude_models`), and `admits` re-checks
        where they really landed."""
        need = sum(milli for _, milli in pods)
        if quota is None or need <= 0:
            return ALLOWED
        extra = extra or {}
        total: Verdict | None = None  # what the cap on the total says, if it blocks
        if quota.gpus is not None:
            cap = gpu_milli(quota.gpus)
            held = self.held_milli(team) + extra.get("", 0)
            if need > cap:
                return Verdict(False, never=True, text=_text(team, cap, "", None, need))
            if held + need > cap:
                total = Verdict(False, text=_text(team, cap, "", held, need))
        # model -> (cap, held, need) of the models full for the workload's pods that may go
        # elsewhere, and of those full even for the pods that may use that model only.
        full: dict[str, tuple[int, int, int]] = {}
        pinned_full: set[str] = set()
        never: dict[str, tuple[int, int]] = {}  # model -> (cap, need of the pods only it may take)
        for model, gpus in sorted(quota.gpus_by_model.items()):
            cap = gpu_milli(gpus)
            held = self.held_milli(team, model) + extra.get(model, 0)
            only_here = sum(milli for models, milli in pods if models == frozenset((model,)))
            may_use = sum(milli for models, milli in pods if models is None or model in models)
            if only_here > cap:
                never[model] = (cap, only_here)  # however long they wait
            elif only_here and held + only_here > cap:
                full[model] = (cap, held, only_here)
                pinned_full.add(model)
            elif may_use and held + may_use > cap:
                full[model] = (cap, held, may_use)
        if never:
            text = "; ".join(_text(team, cap, m, None, n) for m, (cap, n) in never.items())
            return Verdict(False, never=True, text=text)
        if total is not None:
            return total
        # A pod limited to one model that is full, or to several that all are, waits.
        stuck = sorted(
            {
                m
                for models, _ in pods
                if models and (models <= pinned_full if len(models) == 1 else models <= full.keys())
                for m in models
            }
        )
        shown = stuck or sorted(full)
        text = "; ".join(_text(team, full[m][0], m, full[m][1], full[m][2]) for m in shown)
        if stuck:
            return Verdict(False, text=text)
        if full:
            # Pods that may go elsewhere are kept off these models; a pod limited to one
            # of them (which still has room for it) keeps it.
            return Verdict(True, frozenset(full), text=text)
        return ALLOWED

    def admits(self, team: str, quota: TeamQuota | None, held: Iterable[tuple[str, int]]) -> str:
        """'' when `team` may take the (gpu_model, gpu_milli) pairs of a placement on top of
        its usage; otherwise the quota it would exceed (the commit-time re-check: the models
        a placement landed on are known only then)."""
        if quota is None:
            return ""
        total = 0
        by_model: collections.Counter[str] = collections.Counter()
        for model, milli in held:
            total += milli
            by_model[model] += milli
        if not total:
            return ""
        if quota.gpus is not None:
            cap = gpu_milli(quota.gpus)
            if self.held_milli(team) + total > cap:
                return _text(team, cap, "", self.held_milli(team), total)
        for model, milli in sorted(by_model.items()):
            gpus = quota.gpus_by_model.get(model)
            if gpus is not None and self.held_milli(team, model) + milli > gpu_milli(gpus):
                return _text(team, gpu_milli(gpus), model, self.held_milli(team, model), milli)
        return ""


def _text(team: str, cap_milli: int, model: str, held_milli: int | None, need_milli: int) -> str:
    what = f"{model} GPUs" if model else "GPUs"
    held = f", holds {gpus_text(held_milli)}" if held_milli is not None else ""
    return f"team {team}: quota {gpus_text(cap_milli)} {what}{held}, needs {gpus_text(need_milli)}"
