"""Reason codes: small integers in the hot path, text only at the edge.

For a pod that fits nowhere, every node is charged to the *first* filter it fails, in the
fixed order of `Reason` (as kube-scheduler stops at a node's first failing filter), and the
counts read like kube-scheduler's FitError:
"0/10000 nodes are available: 6200 Insufficient nvidia.com/gpu, 3000 node(s) didn't match
GPU model, 800 node(s) had untolerated taint."
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


class Reason(enum.IntEnum):
    """Why a node cannot take a pod (or why a pod was not placed). 0 = placed / fits.

    Filter reasons are listed in the order filters run; a node is charged to the first.
    """

    OK = 0
    NODE_UNSCHEDULABLE = 1  # cordoned
    NODE_NOT_READY = 2  # unhealthy or stale telemetry
    CLUSTER_NOT_ALLOWED = 3
    NODE_AFFINITY = 4  # node selector or required affinity
    UNTOLERATED_TAINT = 5
    GPU_MODEL = 6
    GPU_MEMORY = 7
    INSUFFICIENT_CPU = 8
    INSUFFICIENT_MEMORY = 9
    INSUFFICIENT_GPU = 10  # not enough whole free GPUs (or no GPU at all)
    INSUFFICIENT_GPU_SHARE = 11  # no single GPU with the requested fractional share free
    # Pod-level outcomes (not charged to nodes):
    NO_NODES = 12  # the fleet is empty
    GANG_TOPOLOGY = 13  # every member fits somewhere, but no single domain holds them all
    GANG_MEMBER = 14  # another member of the gang fits nowhere


#: kube-scheduler style text of each reason, used only at the edge.
REASON_TEXT: Mapping[Reason, str] = {
    Reason.OK: "placed",
    Reason.NODE_UNSCHEDULABLE: "node(s) were unschedulable",
    Reason.NODE_NOT_READY: "node(s) were not ready",
    Reason.CLUSTER_NOT_ALLOWED: "node(s) were in a cluster the pod may not use",
    Reason.NODE_AFFINITY: "node(s) didn't match Pod's node affinity/selector",
    Reason.UNTOLERATED_TAINT: "node(s) had untolerated taint",
    Reason.GPU_MODEL: "node(s) didn't match GPU model",
    Reason.GPU_MEMORY: "node(s) had too little GPU memory",
    Reason.INSUFFICIENT_CPU: "Insufficient cpu",
    Reason.INSUFFICIENT_MEMORY: "Insufficient memory",
    Reason.INSUFFICIENT_GPU: "Insufficient nvidia.com/gpu",
    Reason.INSUFFICIENT_GPU_SHARE: "node(s) had no GPU with enough free share",
    Reason.NO_NODES: "no nodes in the fleet",
    Reason.GANG_TOPOLOGY: "no single topology domain could hold the whole gang",
    Reason.GANG_MEMBER: "another pod of the gang could not be placed",
}

N_REASONS = len(Reason)

#: Reasons that only capacity would fix (the node meets every constraint of the pod).
RESOURCE_REASONS = frozenset(
    {
        Reason.INSUFFICIENT_CPU,
        Reason.INSUFFICIENT_MEMORY,
        Reason.INSUFFICIENT_GPU,
        Reason.INSUFFICIENT_GPU_SHARE,
    }
)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Per-reason node counts for one pod: `counts[reason]` nodes failed first on it."""

    n_nodes: int
    n_feasible: int
    counts: tuple[tuple[Reason, int], ...]  # most frequent first, then by code

    @classmethod
    def from_first_failures(cls, first_failure: NDArray[np.int16]) -> Explanation:
        """Build from the per-node first failing reason (0 = node fits)."""
        return cls.from_histogram(np.bincount(first_failure.astype(np.int64), minlength=N_REASONS))

    @classmethod
    def from_histogram(cls, hist: NDArray[np.int64]) -> Explanation:
        """Build from node counts per first failing reason (index 0: nodes that fit)."""
        counts = hist.tolist()
        pairs = [(Reason(r), int(c)) for r, c in enumerate(counts) if r and c]
        pairs.sort(key=lambda rc: (-rc[1], int(rc[0])))
        return cls(n_nodes=int(sum(counts)), n_feasible=int(counts[0]), counts=tuple(pairs))

    @property
    def dominant(self) -> Reason:
        """The one reason to report for the pod: OK if some node fits, NO_NODES if there
        are no nodes; if some nodes meet every constraint of the pod, the shortage most of
        them have (that is what capacity would fix); otherwise the constraint that excluded
        the most nodes. Ties go to the lower code."""
        if self.n_feasible:
            return Reason.OK
        if not self.counts:
            return Reason.NO_NODES
        short = [rc for rc in self.counts if rc[0] in RESOURCE_REASONS]
        return (short or list(self.counts))[0][0]

    def text(self) -> str:
        """kube-scheduler style: "0/10 nodes are available: 6 Insufficient cpu, ..."."""
        head = f"{self.n_feasible}/{self.n_nodes} nodes are available"
        if not self.counts:
            return head + "."
        body = ", ".join(f"{c} {REASON_TEXT[r]}" for r, c in self.counts)
        return f"{head}: {body}."


def reason_text(code: int) -> str:
    """Text of one pod-level reason code."""
    return REASON_TEXT[Reason(code)]
