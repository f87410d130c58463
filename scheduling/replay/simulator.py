"""Arrival-only replay of an openb workload, the FGD artifact's experiment (pure, numpy only).

The replay runs fleetd's placement engine (`scheduling.placement.place`, the one packer) over
the whole arrival sequence in FIFO order: each pod goes to the best feasible node under the
policy or, when no node can take it, is skipped and the next pod is tried. There are no
departures, so within the one call resources only shrink, exactly the artifact's setting.
The result is then committed to the fleet (re-checked, all or nothing), and the recorder's
two counters are derived per arrival: GPU milli of all arrived pods and GPU milli allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from scheduling.fleet import Fleet, NodeSpec
from scheduling.placement import commit, place
from scheduling.replay.trace import MILLI_PER_GPU, NodeTrace, PodTrace
from scheduling.scoring import Policy
from scheduling.workload import Batch, Order, PodSpec

CLUSTER = "openb"


def build_fleet(
    nodes: NodeTrace, names: Sequence[str], slot_order: NDArray[np.int64] | None = None
) -> Fleet:
    """A fleet of the trace's nodes, all idle, added in `slot_order` (default: trace order).

    Slot s holds trace node `slot_order[s]`; the engine breaks score ties by lowest slot, so
    the slot order is the tie-break order (the artifact's random node-name prefixes for FGD).
    """
    order = np.arange(nodes.n_nodes, dtype=np.int64) if slot_order is None else slot_order
    max_gpus = max(int(nodes.num_gpus.max()), 1) if nodes.n_nodes else 1
    fleet = Fleet(max_gpus=max_gpus, initial_capacity=max(nodes.n_nodes, 1))
    for i in order.tolist():
        model = int(nodes.model_id[i])
        fleet.add_node(
            NodeSpec(
                name=names[i],
                cluster=CLUSTER,
                cpu_millicores=int(nodes.cpu_milli[i]),
                memory_bytes=int(nodes.memory_bytes[i]),
                gpu_count=int(nodes.num_gpus[i]),
                gpu_model=nodes.models[model] if model >= 0 else "",
            )
        )
    return fleet


def fleet_model_ids(fleet: Fleet, models: Sequence[str]) -> NDArray[np.int64]:
    """(len(models),) the fleet's GPU model id of each trace model name (-1 if absent)."""
    return np.array([fleet.gpu_models.get(m) for m in models], dtype=np.int64)


def pod_specs(pods: PodTrace, names: Sequence[str]) -> list[PodSpec]:
    """One PodSpec per pod row: whole GPUs as num_gpu, a share as gpu_milli, gpu_spec models."""
    specs = []
    for row in range(pods.n_pods):
        num_gpu = int(pods.num_gpu[row])
        milli = int(pods.gpu_milli[row])
        spec = pods.specs[int(pods.spec_id[row])]
        specs.append(
            PodSpec(
                name=names[row],
                cpu_millicores=int(pods.cpu_milli[row]),
                memory_bytes=int(pods.memory_bytes[row]),
                num_gpu=num_gpu if milli >= MILLI_PER_GPU else 0,
                gpu_milli=milli if 0 < milli < MILLI_PER_GPU else 0,
                gpu_models=tuple(m for m in spec.split("|") if m) if num_gpu else (),
            )
        )
    return specs


@dataclass(frozen=True)
class ReplayResult:
    """Every decision of one replay, in arrival order.

    order: (n_arrivals,) int64 pod row of each arrival.
    node: (n_arrivals,) int64 chosen node (index in the trace's node list), -1 if skipped.
    gpu_take_milli: (n_arrivals, max_gpus) int64 milli taken from each GPU of the chosen node.
    arrived_gpu_milli: (n_arrivals,) int64 cumulative GPU request of arrived pods.
    used_gpu_milli: (n_arrivals,) int64 GPU milli allocated after each arrival.
    """

    order: NDArray[np.int64]
    node: NDArray[np.int64]
    gpu_take_milli: NDArray[np.int64]
    arrived_gpu_milli: NDArray[np.int64]
    used_gpu_milli: NDArray[np.int64]


def replay(
    fleet: Fleet,
    slot_node: NDArray[np.int64],
    pods: PodTrace,
    specs: Sequence[PodSpec],
    order: NDArray[np.int64],
    policy: Policy,
) -> ReplayResult:
    """Replay arrivals `order` (pod rows) on `fleet` with `policy`; commits to the fleet.

    slot_node: (n_slots,) trace node index of each fleet slot; specs: PodSpec per pod row.
    Redrawn rows arrive as pods named "<name>-tuned-<i>", as in the artifact.
    """
    n_rows = pods.n_pods
    queue: list[PodSpec] = []
    tuned = 0
    for i, row in enumerate(order.tolist()):
        spec = specs[row]
        if i >= n_rows:
            spec = PodSpec(
                name=f"{spec.name}-tuned-{tuned}",
                cpu_millicores=spec.cpu_millicores,
                memory_bytes=spec.memory_bytes,
                num_gpu=spec.num_gpu,
                gpu_milli=spec.gpu_milli,
                gpu_models=spec.gpu_models,
            )
            tuned += 1
        queue.append(spec)
    result = place(fleet, Batch.of(queue), policy, order=Order.FIFO)
    commit(fleet, result)
    placed = result.node_slot >= 0
    request = pods.gpu_request_milli[order]
    max_gpus = fleet.max_gpus
    bits = (result.gpu_mask[:, None] >> np.arange(max_gpus, dtype=np.int64)[None, :]) & 1
    take = bits * result.gpu_milli_per_gpu[:, None]
    return ReplayResult(
        order=order,
        node=np.where(placed, slot_node[np.maximum(result.node_slot, 0)], -1).astype(np.int64),
        gpu_take_milli=take.astype(np.int64),
        arrived_gpu_milli=np.cumsum(request).astype(np.int64),
        used_gpu_milli=np.cumsum(np.where(placed, request, 0)).astype(np.int64),
    )
