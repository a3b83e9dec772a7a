"""Admission: which queued jobs start now. Pure functions, no Ray.

Order is priority (high first), then age. A job starts only when its whole gang fits.
Smaller jobs may backfill past a blocked job, but once the blocked job has waited
`starvation_s`, nothing may pass it any more, so the cluster drains until it fits.
A job that cannot fit even on the empty cluster is unschedulable and blocks no one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Demand:
    """What a job needs: `workers` units (bundles) of cpus/gpus each, placed together."""

    workers: int
    cpus: float
    gpus: float = 0
    placement: str = "pack"
    group: int = 1  # workers per unit that must share a node (resources.colocate)

    def describe(self) -> str:
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        unit = "workers" if self.group == 1 else f"groups of {self.group} workers on one node"
        return f"{self.workers} {unit} x ({self.cpus:g} CPU{gpu}, {self.placement})"


@dataclass(frozen=True)
class NodeFree:
    cpus: float
    gpus: float = 0


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    submitted_at: float
    demand: Demand


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)        # job -> why it waits
    unschedulable: dict[str, str] = field(default_factory=dict)  # job -> why it can never fit


def slots(node: NodeFree, demand: Demand) -> int:
    """How many workers of this demand fit on one node."""
    counts = [math.floor(node.cpus / demand.cpus + 1e-9)] if demand.cpus else []
    if demand.gpus:
        counts.append(math.floor(node.gpus / demand.gpus + 1e-9))
    return max(0, min(counts)) if counts else demand.workers


def fits(demand: Demand, nodes: list[NodeFree]) -> bool:
    per_node = [slots(n, demand) for n in nodes]
    if demand.placement == "strict_spread":
        return sum(1 for s in per_node if s >= 1) >= demand.workers
    if demand.placement == "strict_pack":
        return any(s >= demand.workers for s in per_node)
    return sum(per_node) >= demand.workers  # pack and spread are best-effort in Ray


def take(demand: Demand, nodes: list[NodeFree]) -> list[NodeFree]:
    """The free capacity left after placing `demand` (roughly as Ray would place it)."""
    left = list(nodes)
    need = demand.workers

    def place(i: int, n: int) -> None:
        left[i] = NodeFree(left[i].cpus - n * demand.cpus, left[i].gpus - n * demand.gpus)

    if demand.placement in ("spread", "strict_spread"):
        rounds = 1 if demand.placement == "strict_spread" else demand.workers
        for _ in range(rounds):  # one worker per node per round
            for i in range(len(left)):
                if need and slots(left[i], demand) >= 1:
                    place(i, 1)
                    need -= 1
            if not need:
                break
    else:  # pack: fill the roomiest nodes first
        for i in sorted(range(len(left)), key=lambda i: -slots(left[i], demand)):
            n = min(need, slots(left[i], demand))
            place(i, n)
            need -= n
    return left


def plan(queued: list[QueuedJob], free: list[NodeFree], total: list[NodeFree],
         now: float, starvation_s: float = 600.0) -> Plan:
    result = Plan()
    blocked_too_long = False
    for job in sorted(queued, key=lambda j: (-j.priority, j.submitted_at, j.job_id)):
        if not fits(job.demand, total):
            result.unschedulable[job.job_id] = (
                f"needs {job.demand.describe()}, more than the whole cluster has"
            )
            continue
        if blocked_too_long:
            result.waiting[job.job_id] = "waiting behind a job that has waited too long to be passed"
            continue
        if fits(job.demand, free):
            result.start.append(job.job_id)
            free = take(job.demand, free)
            continue
        result.waiting[job.job_id] = f"waiting for resources: needs {job.demand.describe()}"
        if now - job.submitted_at >= starvation_s:
            blocked_too_long = True
    return result
