"""From the controller's job records and Ray's node inventory to the pure scheduler's inputs.

No Ray here either: the controller hands in the records, the nodes (cluster/inventory.py
NodeCapacity, or anything with the same fields) and the queues; tests hand in the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..spec import JobSpec
from .record import JobRecord
from .scheduler import Demand, NodeFree, Preemption, QueuedJob, QueueQuota, RunningJob
from .states import JobState


def demand_of(spec: JobSpec, workers: int | None = None) -> Demand:
    """What the job reserves at `workers` ranks (default: its full size); a colocated group of
    workers is placed like one big worker."""
    r = spec.resources
    c = r.colocate
    return Demand((workers or r.workers) // c, r.cpus_per_worker * c, r.gpus_per_worker * c, r.placement, group=c)


def preempted_by(job: JobRecord) -> str | None:
    """The job the last preemption made room for (None: never preempted, or by a drain)."""
    return job.preemptions[-1].by if job.preemptions else None


def steps_since_checkpoint(job: JobRecord) -> int:
    """The steps a preemption would make the job redo (if it could not save just in time)."""
    step = int((job.progress or {}).get("step") or 0)
    saved = int((job.checkpoint or {}).get("step") or 0)
    return max(0, step - saved)


@dataclass(frozen=True)
class Inputs:
    queued: list[QueuedJob]
    running: list[RunningJob]
    free: list[NodeFree]
    total: list[NodeFree]
    cordoned: frozenset[int]
    queues: Mapping[str, QueueQuota]


def inputs(jobs: Iterable[JobRecord], nodes: list, queues: Mapping[str, QueueQuota],
           sizes: Callable[[JobRecord], tuple[int, ...]], draining: Iterable[str] = (),
           releasing: Mapping[str, Preemption] | None = None) -> Inputs:
    """`nodes`: alive nodes (node_id, cpus, gpus, free_cpus, free_gpus); `sizes(job)`: the worker
    counts an elastic job may run at (elastic.allowed_sizes), () for a fixed one; `draining`: node
    ids nothing new goes to; `releasing`: victim id -> the preemption the controller asked of it
    (the record only has it once the gang is given back)."""
    releasing = releasing or {}
    index = {n.node_id: i for i, n in enumerate(nodes)}
    queued: list[QueuedJob] = []
    running: list[RunningJob] = []
    for job in jobs:
        spec = job.spec
        if job.state is JobState.QUEUED:
            queued.append(QueuedJob(job.id, job.priority, job.submitted_at, demand_of(spec), queue=spec.queue,
                                    sizes=sizes(job), preempted_by=preempted_by(job),
                                    preemptible=spec.preemptible))
        elif job.state.holds_resources:
            running.append(_running(job, index, sizes(job), releasing.get(job.id)))
    return Inputs(
        queued=queued, running=running,
        free=[NodeFree(n.free_cpus, n.free_gpus) for n in nodes],
        total=[NodeFree(n.cpus, n.gpus) for n in nodes],
        cordoned=frozenset(index[node] for node in draining if node in index),
        queues=queues,
    )


def _running(job: JobRecord, index: Mapping[str, int], sizes: tuple[int, ...],
             asked: Preemption | None) -> RunningJob:
    spec = job.spec
    demand = demand_of(spec, job.workers)
    # a bundle's node is its first rank's node (ranks are laid out bundle by bundle)
    by_rank = {p.rank: p.node_id for p in job.placement}
    bundle_nodes = [by_rank.get(b * demand.group) for b in range(demand.workers)]
    nodes = tuple(index[n] for n in bundle_nodes) if all(n in index for n in bundle_nodes) else ()
    releasing_for = shrinking_to = None
    if job.state is JobState.PREEMPTING and asked is not None:
        releasing_for, shrinking_to = asked.by, asked.shrink_to
    return RunningJob(
        job.id, job.priority, demand, job.started_at or job.submitted_at, queue=spec.queue, nodes=nodes,
        steps_since_checkpoint=steps_since_checkpoint(job), preemptible=spec.preemptible,
        running=job.state is JobState.RUNNING, min_runtime_s=spec.preemption.min_runtime_s,
        preempted_by=preempted_by(job), releasing_for=releasing_for, shrinking_to=shrinking_to,
        sizes=sizes, full_workers=spec.resources.workers,
    )
