"""`Placement.ListWorkloads`: the reservations fleetd holds and the workloads it queued, a
page at a time, for the on-call and for tools (`fleetd workloads`).

Pages are ordered by workload id and the page token is the last id of a page, so paging
stays consistent while workloads come and go: each one present throughout is listed once,
one placed or released in between shows in its new state or not at all.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import heapq
import itertools
import operator
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetd.api.validation import InvalidArgument
from fleetd.config import Config
from fleetd.engine import GPU_MILLI, PodRequest
from fleetd.journal import ReservedPod
from fleetd.state import Decision, Explanation, FleetState

#: Workloads a page when the request says 0, and at most.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

PENDING, CONFIRMED, QUEUED = "pending", "confirmed", "queued"


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """One listed workload, in the daemon's values (`fleetd.v1.WorkloadStatus`)."""

    workload_id: str
    team: str
    state: str  # PENDING | CONFIRMED | QUEUED
    priority: int
    effective_priority: int
    since_s: float
    expires_at_s: float  # 0 unless PENDING
    pods: int
    gpu_milli: int
    placements: tuple[ReservedPod, ...]
    queue_position: int  # 0 unless QUEUED
    #: QUEUED: why it did not fit at its last try, and when (None, 0: not known).
    explanation: Explanation | None
    explained_at_s: float
    decision_seq: int


def encode_token(workload_id: str) -> str:
    """The page token after `workload_id` (opaque to clients)."""
    return base64.urlsafe_b64encode(workload_id.encode()).decode()


def decode_token(token: str) -> str:
    """The workload id a page token names; InvalidArgument when it is no such token."""
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (UnicodeError, binascii.Error, ValueError):
        raise InvalidArgument("page_token", "is not a next_page_token of ListWorkloads") from None


def page_size(requested: int) -> int:
    """The page size a request asks for (0: the default); InvalidArgument above the max."""
    if requested > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}, got {requested}")
    return requested or DEFAULT_PAGE_SIZE


def list_workloads(
    state: FleetState,
    config: Config,
    *,
    teams: Collection[str] | None,
    states: Collection[str],
    size: int,
    after: str,
) -> tuple[list[WorkloadStatus], str]:
    """A page of up to `size` workloads with ids after `after`, of `teams` (None: every
    team) and in `states`; and the id to continue after ("" when this was the last page)."""

    def wanted(workload_id: str, team: str) -> bool:
        return workload_id > after and (teams is None or team in teams)

    held = state.held
    queue = state.queue
    ids: Iterator[str] = iter(())
    if PENDING in states or CONFIRMED in states:
        ids = (
            wid
            for wid, h in held.items()
            if h.record.state in states and wanted(wid, h.record.team)
        )
    if QUEUED in states:
        queued_ids = (wid for wid, q in queue.items() if wanted(wid, q.request.team))
        ids = itertools.chain(ids, queued_ids)
    # (The page and one more, to know whether another page follows: O(n log size).)
    chosen = heapq.nsmallest(size + 1, ids)
    more = len(chosen) > size
    chosen = chosen[:size]
    positions = _queue_positions(queue, [wid for wid in chosen if wid in queue])
    out = []
    for wid in chosen:
        h = held.get(wid)
        if h is not None:
            r = h.record
            out.append(
                WorkloadStatus(
                    workload_id=wid,
                    team=r.team,
                    state=r.state,
                    priority=r.priority,
                    effective_priority=config.team_priority(r.team) + r.priority,
                    since_s=r.created_at_s,
                    expires_at_s=r.expires_at_s if r.state == PENDING else 0.0,
                    pods=len(r.pods),
                    gpu_milli=sum(p.gpu_milli * len(p.gpu_indices) for p in r.pods),
                    placements=r.pods,
                    queue_position=0,
                    explanation=None,
                    explained_at_s=0.0,
                    decision_seq=r.decision_seq,
                )
            )
            continue
        q = queue[wid]
        req = q.request
        why, why_s = q.explanation, q.explained_s
        if why is None:  # (not tried since a restart: the decision that queued it, if kept)
            decision = _retained(state.history, q.seq)
            if decision is not None:
                why, why_s = decision.explanation, decision.time_s
        out.append(
            WorkloadStatus(
                workload_id=wid,
                team=req.team,
                state=QUEUED,
                priority=req.priority,
                effective_priority=config.team_priority(req.team) + req.priority,
                since_s=q.since_s,
                expires_at_s=0.0,
                pods=len(req.pods),
                gpu_milli=sum(_gpu_milli(p) for p in req.pods),
                placements=(),
                queue_position=positions[wid],
                explanation=why,
                explained_at_s=why_s,
                decision_seq=q.seq,
            )
        )
    return out, (chosen[-1] if more else "")


def _queue_positions(queue: dict[str, Any], workload_ids: list[str]) -> dict[str, int]:
    """Each of `workload_ids`' place in the queue's retry order (effective priority, then
    the decision that queued it: `FleetState._retry_queue`), 1 for the next. Counted on the
    queue's keys sorted by numpy: sorting 100,000 entries in Python took ~115 ms of the
    event loop for every page."""
    if not workload_ids:
        return {}
    n = len(queue)
    priority = np.fromiter((q.priority for q in queue.values()), np.int64, n)
    seq = np.fromiter((q.seq for q in queue.values()), np.int64, n)
    order = np.lexsort((seq, -priority))
    ahead_key, seq_sorted = -priority[order], seq[order]
    positions = {}
    for wid in workload_ids:
        q = queue[wid]
        lo = int(np.searchsorted(ahead_key, -q.priority, "left"))
        hi = int(np.searchsorted(ahead_key, -q.priority, "right"))
        positions[wid] = lo + int(np.searchsorted(seq_sorted[lo:hi], q.seq, "left")) + 1
    return positions


def _gpu_milli(pod: PodRequest) -> int:
    return pod.gpu_count * GPU_MILLI + pod.gpu_milli


def _retained(history: Sequence[Decision], seq: int) -> Decision | None:
    """The retained decision `seq` (the history is in seq order), or None."""
    at = bisect.bisect_left(history, seq, key=operator.attrgetter("seq"))
    if at < len(history) and history[at].seq == seq:
        return history[at]
    return None
