"""Admission: which queued jobs start now, at what size, and whom they preempt. Pure, no Ray.

Inside a queue, order is priority (high first), then age. A job starts only when its whole
gang fits (an elastic job: its largest allowed size that fits, at least `min_workers`).
Smaller jobs may backfill past a blocked job, but once the blocked job has waited
`starvation_s`, nothing may pass it any more, so the cluster drains until it fits.
A job that cannot fit even on the empty cluster is unschedulable and blocks no one.

Queues: a job is admitted within its queue's nominal quota; beyond it only if the queue may
borrow (and the job is preemptible: borrowed capacity must be reclaimable). Between queues,
the queue whose next job is within its quota goes first, then the one with the lowest
dominant resource share per weight (DRF, counting half of its next job), so capacity is
shared by weight.

Elastic jobs (`sizes`) start at the largest allowed size that fits and preempt only for their
smallest; a running one grows into what is left once nobody of its priority or higher waits
for room and `grow_cooldown_s` has passed since it started or was last resized. Nothing new
goes to a `cordoned` (draining) node.

Preemption, for a job that does not fit even at its smallest size: victims are running jobs
of strictly lower priority (in its own queue, or in a queue over its quota), or, when the
job's own queue is within its quota, any job of a queue that borrows (reclaim is by quota,
not priority). Never a non-preemptible job, one that has run less than its min_runtime_s,
or the job that preempted the preemptor (no back and forth). Victims are the fewest and
cheapest: lowest priority, then least work lost (steps since the last checkpoint), then the
youngest; an elastic victim shrinks to its smallest size before anyone is evicted. Priorities
only flow downwards and a preempted job waits while its preemptor is queued, so three
priorities cannot loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


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

    @property
    def total_cpus(self) -> float:
        return self.workers * self.cpus

    @property
    def total_gpus(self) -> float:
        return self.workers * self.gpus

    def at(self, workers: int) -> Demand:
        """The same job at another size, `workers` ranks (a multiple of `group`)."""
        return replace(self, workers=workers // self.group)


@dataclass(frozen=True)
class NodeFree:
    cpus: float
    gpus: float = 0


@dataclass(frozen=True)
class QueueQuota:
    name: str
    cpus: float | None = None  # nominal quota; None: no quota (the whole cluster)
    gpus: float | None = None
    weight: float = 1.0        # fair share between queues (dominant resource share / weight)
    borrow: bool = True        # may use capacity beyond the quota that others leave idle


DEFAULT_QUEUE = QueueQuota("default")


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    submitted_at: float
    demand: Demand                   # at the full size (spec.resources.workers)
    queue: str = "default"
    sizes: tuple[int, ...] = ()      # elastic: allowed worker counts (empty: the full size only)
    preempted_by: str | None = None  # the job that preempted it last
    preemptible: bool = True         # spec.preemptible (a non-preemptible job never borrows)


@dataclass(frozen=True)
class RunningJob:
    """A job holding resources (STARTING .. POST_TRAINING)."""

    job_id: str
    priority: int
    demand: Demand                       # as held now (bundles at the current size)
    started_at: float                    # this run's start: its admission or its last resize
    queue: str = "default"
    nodes: tuple[int, ...] = ()          # index into free/total of each bundle's node
    steps_since_checkpoint: int = 0      # the work a preemption would lose
    preemptible: bool = True             # spec.preemptible
    running: bool = True                 # RUNNING: it can be asked to checkpoint now
    min_runtime_s: float = 60.0          # spec.preemption.min_runtime_s
    preempted_by: str | None = None      # who preempted it last
    releasing_for: str | None = None     # PREEMPTING: the job it makes room for
    shrinking_to: int | None = None      # ... keeping this many workers (None: all released)
    sizes: tuple[int, ...] = ()          # elastic: allowed worker counts
    full_workers: int | None = None      # spec.resources.workers: what it grows back to

    @property
    def workers(self) -> int:
        return self.demand.workers * self.demand.group


@dataclass(frozen=True)
class Preemption:
    victim: str
    by: str
    shrink_to: int | None = None  # workers the victim keeps (elastic); None: evict it
    reason: str = "priority"      # "priority", or "reclaim": capacity its queue borrowed


@dataclass(frozen=True)
class Grow:
    job_id: str
    to_workers: int


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)               # in admission order
    sizes: dict[str, int] = field(default_factory=dict)          # job -> workers to reserve
    waiting: dict[str, str] = field(default_factory=dict)        # job -> why it waits
    unschedulable: dict[str, str] = field(default_factory=dict)  # job -> why it can never fit
    preempt: list[Preemption] = field(default_factory=list)
    grow: list[Grow] = field(default_factory=list)


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


def job_sizes(demand: Demand, sizes: Sequence[int] = ()) -> list[int]:
    """The worker counts a job may run at, largest first (its full size when not elastic)."""
    full = demand.workers * demand.group
    allowed = {s for s in sizes if 0 < s <= full and s % demand.group == 0} or {full}
    return sorted(allowed, reverse=True)


def dominant_share(cpus: float, gpus: float, cluster: NodeFree) -> float:
    """The larger of a queue's CPU and GPU shares of the cluster (DRF's dominant resource)."""
    shares = [cpus / cluster.cpus if cluster.cpus else 0.0]
    if cluster.gpus:
        shares.append(gpus / cluster.gpus)
    return max(shares)


def _add(nodes: list[NodeFree], index: int, cpus: float, gpus: float) -> None:
    nodes[index] = NodeFree(nodes[index].cpus + cpus, nodes[index].gpus + gpus)


class _Usage:
    """CPUs and GPUs each queue holds, and its quota."""

    def __init__(self, queues: Mapping[str, QueueQuota], running: Sequence[RunningJob]):
        self.queues = queues
        self.held: dict[str, list[float]] = {}
        for job in running:
            self.change(job.queue, job.demand.total_cpus, job.demand.total_gpus)

    def quota(self, queue: str) -> QueueQuota:
        return self.queues.get(queue) or (DEFAULT_QUEUE if queue == "default" else QueueQuota(queue))

    def change(self, queue: str, cpus: float, gpus: float) -> None:
        held = self.held.setdefault(queue, [0.0, 0.0])
        held[0] += cpus
        held[1] += gpus

    def of(self, queue: str) -> tuple[float, float]:
        cpus, gpus = self.held.get(queue, (0.0, 0.0))
        return cpus, gpus

    def over_by(self, queue: str, cpus: float = 0.0, gpus: float = 0.0) -> str | None:
        """None if the queue stays within its nominal quota after adding this much, else why not."""
        q = self.quota(queue)
        used_cpus, used_gpus = self.of(queue)
        for used, need, nominal, unit in ((used_cpus, cpus, q.cpus, "CPUs"), (used_gpus, gpus, q.gpus, "GPUs")):
            if nominal is not None and used + need > nominal + 1e-9:
                return f"queue {queue} is at its quota ({used:g}/{nominal:g} {unit}; the job needs {need:g})"
        return None

    def borrowing(self, queue: str) -> bool:
        return self.over_by(queue) is not None

    def share(self, queue: str, cluster: NodeFree, cpus: float = 0.0, gpus: float = 0.0) -> float:
        """Dominant share per weight, with this much more held."""
        held_cpus, held_gpus = self.of(queue)
        return dominant_share(held_cpus + cpus, held_gpus + gpus, cluster) / max(self.quota(queue).weight, 1e-9)


def plan(queued: list[QueuedJob], free: list[NodeFree], total: list[NodeFree],
         now: float, starvation_s: float = 600.0, *,
         running: Sequence[RunningJob] = (), queues: Mapping[str, QueueQuota] | None = None,
         cordoned: frozenset[int] = frozenset(), grow_cooldown_s: float = 300.0) -> Plan:
    """Decide one scheduling tick. `free[i]`/`total[i]` describe node i; `cordoned` nodes
    (draining) take nothing new. See the module docstring for the rules."""
    return _Planner(queued, free, total, now, starvation_s, running, queues or {}, cordoned,
                    grow_cooldown_s).run()


class _Planner:
    def __init__(self, queued, free, total, now, starvation_s, running, queues, cordoned, grow_cooldown_s):
        self.queued: list[QueuedJob] = list(queued)
        self.total = list(total)
        self.free = [NodeFree(0, 0) if i in cordoned else n for i, n in enumerate(free)]
        self.start_free = list(self.free)
        self.now = now
        self.starvation_s = starvation_s
        self.running: list[RunningJob] = list(running)
        self.cordoned = cordoned
        self.grow_cooldown_s = grow_cooldown_s
        self.usage = _Usage(queues, self.running)
        self.cluster = NodeFree(sum(n.cpus for n in total), sum(n.gpus for n in total))
        self.result = Plan()
        self.queued_ids = {j.job_id for j in self.queued}
        self.victims: set[str] = {r.job_id for r in self.running if r.releasing_for}
        self.blocked_too_long = False
        self.started_queues: set[str] = set()
        self.waits_for_room: list[int] = []  # priorities of jobs that wait for capacity

    # ---- order ------------------------------------------------------------------------
    def run(self) -> Plan:
        def by_priority(j: QueuedJob):
            return (-j.priority, j.submitted_at, j.job_id)

        # Room is being made for these jobs: they go before anyone else can take it.
        claimants = {r.releasing_for for r in self.running if r.releasing_for}
        claimants |= {j.preempted_by for j in self.queued if j.preempted_by}
        for job in sorted((j for j in self.queued if j.job_id in claimants), key=by_priority):
            self.decide(job)
        pending: dict[str, list[QueuedJob]] = {}
        for job in sorted((j for j in self.queued if j.job_id not in claimants), key=by_priority):
            pending.setdefault(job.queue, []).append(job)
        while pending:
            queue = min(pending, key=self._queue_order(pending))
            self.decide(pending[queue].pop(0))
            if not pending[queue]:
                del pending[queue]
        self.grow_elastic()
        return self.result

    def _queue_order(self, pending: dict[str, list[QueuedJob]]):
        def key(queue: str):
            head = pending[queue][0]
            smallest = head.demand.at(job_sizes(head.demand, head.sizes)[-1])
            beyond_quota = self.usage.over_by(queue, smallest.total_cpus, smallest.total_gpus) is not None
            # its share counting half its next job: whole jobs overshoot a weight, by the job's size,
            # and counting all of it favours the heavier queue (benchmarks/scheduling.py part 3)
            share = self.usage.share(queue, self.cluster, smallest.total_cpus / 2, smallest.total_gpus / 2)
            return (beyond_quota, share, -head.priority, head.submitted_at, queue)
        return key

    # ---- one job ----------------------------------------------------------------------
    def decide(self, job: QueuedJob) -> None:
        r = self.result
        sizes = job_sizes(job.demand, job.sizes)
        smallest = job.demand.at(sizes[-1])
        quota = self.usage.quota(job.queue)
        if not fits(smallest, self.total):
            r.unschedulable[job.job_id] = f"needs {smallest.describe()}, more than the whole cluster has"
            return
        never_within = self._over_nominal(job.queue, smallest)
        if never_within and not (quota.borrow and job.preemptible):
            r.unschedulable[job.job_id] = (f"needs {smallest.describe()}, more than queue {job.queue}'s quota "
                                           f"allows ({never_within}) and it may not borrow; raise the quota "
                                           f"with `trainctl queue set {job.queue}`")
            return
        if job.preempted_by in self.queued_ids and job.preempted_by not in r.start:
            r.waiting[job.job_id] = f"waiting for {job.preempted_by}, which preempted it, to start first"
            return
        if self.blocked_too_long:
            r.waiting[job.job_id] = "waiting behind a job that has waited too long to be passed"
            return
        allowed = [s for s in sizes if self._may_use(job, job.demand.at(s)) is None]
        if not allowed:
            r.waiting[job.job_id] = self._may_use(job, smallest)
            return
        for size in allowed:
            demand = job.demand.at(size)
            if fits(demand, self.free):
                self._start(job, demand, size)
                return
        self.waits_for_room.append(job.priority)
        need = job.demand.at(allowed[-1])
        if self._room_being_made(job, need):
            r.waiting[job.job_id] = "waiting for a lower-priority job to checkpoint and stop"
            return
        victims = self._choose_victims(job, need, respect_min_runtime=True)
        if victims:
            r.preempt.extend(victims)
            self.victims.update(v.victim for v in victims)
            names = ", ".join(v.victim for v in victims)
            r.waiting[job.job_id] = f"waiting for a lower-priority job to checkpoint and stop ({names})"
            return
        reason = f"waiting for resources: needs {need.describe()}"
        if self._choose_victims(job, need, respect_min_runtime=False):
            reason += " (jobs it may preempt have not yet run their preemption.min_runtime_s)"
        elif fits(need, self.start_free) and self.started_queues - {job.queue}:
            others = ", ".join(sorted(self.started_queues - {job.queue}))
            reason = (f"waiting for its fair share: queue {others} had a lower share per weight "
                      f"and took the free room; needs {need.describe()}")
        r.waiting[job.job_id] = reason
        if self.now - job.submitted_at >= self.starvation_s:
            self.blocked_too_long = True

    def _over_nominal(self, queue: str, demand: Demand) -> str | None:
        """Why this demand alone exceeds the queue's nominal quota (even with the queue empty)."""
        q = self.usage.quota(queue)
        for need, nominal, unit in ((demand.total_cpus, q.cpus, "CPUs"), (demand.total_gpus, q.gpus, "GPUs")):
            if nominal is not None and need > nominal + 1e-9:
                return f"{nominal:g} {unit}"
        return None

    def _may_use(self, job: QueuedJob, demand: Demand) -> str | None:
        """None if the queue's quota lets this demand start, else the rule that keeps it waiting."""
        over = self.usage.over_by(job.queue, demand.total_cpus, demand.total_gpus)
        if over is None:
            return None
        if not self.usage.quota(job.queue).borrow:
            return f"{over}, and it may not borrow"
        if not job.preemptible:
            return f"{over}; a non-preemptible job does not borrow"
        return None

    def _start(self, job: QueuedJob, demand: Demand, size: int) -> None:
        self.result.start.append(job.job_id)
        self.result.sizes[job.job_id] = size
        self.free = take(demand, self.free)
        self.usage.change(job.queue, demand.total_cpus, demand.total_gpus)
        self.started_queues.add(job.queue)

    # ---- preemption --------------------------------------------------------------------
    def _released(self, victim: RunningJob, keep_workers: int | None) -> list[tuple[int, float, float]]:
        """(node, cpus, gpus) a victim frees: the bundles beyond the ones it keeps (its last ones)."""
        keep = (keep_workers or 0) // victim.demand.group
        return [(node, victim.demand.cpus, victim.demand.gpus) for node in victim.nodes[keep:]
                if node not in self.cordoned]

    def _free_with(self, releases: list[tuple[RunningJob, int | None]]) -> list[NodeFree]:
        nodes = list(self.free)
        for victim, keep in releases:
            for node, cpus, gpus in self._released(victim, keep):
                _add(nodes, node, cpus, gpus)
        return nodes

    def _room_being_made(self, job: QueuedJob, need: Demand) -> bool:
        """Jobs preempted for this one are still checkpointing: wait for them, preempt no more."""
        releasing = [(r, r.shrinking_to) for r in self.running if r.releasing_for == job.job_id]
        return bool(releasing) and fits(need, self._free_with(releasing))

    def _eligible(self, job: QueuedJob, victim: RunningJob, need: Demand, chosen: list[Preemption],
                  respect_min_runtime: bool) -> str | None:
        """Why `job` may preempt `victim` ("priority" or "reclaim"), or None."""
        if (victim.job_id in self.victims or not victim.preemptible or not victim.running
                or len(victim.nodes) != victim.demand.workers or victim.job_id == job.preempted_by):
            return None
        if respect_min_runtime and self.now - victim.started_at < victim.min_runtime_s:
            return None
        usage = _Usage(self.usage.queues, ())  # what the victim's queue holds once `chosen` have gone
        usage.held = {q: list(v) for q, v in self.usage.held.items()}
        for p in chosen:
            gone = next(r for r in self.running if r.job_id == p.victim)
            kept = gone.demand.at(p.shrink_to) if p.shrink_to else replace(gone.demand, workers=0)
            usage.change(gone.queue, kept.total_cpus - gone.demand.total_cpus,
                         kept.total_gpus - gone.demand.total_gpus)
        borrowing = usage.borrowing(victim.queue)
        if victim.priority < job.priority and (victim.queue == job.queue or borrowing):
            return "priority"
        if victim.queue != job.queue and borrowing and \
                self.usage.over_by(job.queue, need.total_cpus, need.total_gpus) is None:
            return "reclaim"
        return None

    def _choose_victims(self, job: QueuedJob, need: Demand, respect_min_runtime: bool) -> list[Preemption]:
        order = sorted(self.running, key=lambda v: (v.priority, v.steps_since_checkpoint, -v.started_at, v.job_id))
        chosen: list[Preemption] = []
        by_id = {r.job_id: r for r in self.running}
        releasing = [(r, r.shrinking_to) for r in self.running if r.releasing_for == job.job_id]

        def room(plan: list[Preemption]) -> bool:
            return fits(need, self._free_with(releasing + [(by_id[p.victim], p.shrink_to) for p in plan]))

        # First pass: every eligible victim, shrunk where it is elastic, until the job fits.
        for victim in order:
            reason = self._eligible(job, victim, need, chosen, respect_min_runtime)
            if reason is None:
                continue
            smaller = [s for s in job_sizes(victim.demand, victim.sizes) if s < victim.workers]
            shrink = min(smaller) if victim.sizes and smaller else None
            chosen.append(Preemption(victim.job_id, job.job_id, shrink, reason))
            if room(chosen):
                break
        else:
            # Shrinking them all is not enough: evict the shrunk ones too, cheapest first.
            for i, p in enumerate(chosen):
                if p.shrink_to is not None:
                    chosen[i] = replace(p, shrink_to=None)
                    if room(chosen):
                        break
            else:
                if not room(chosen):
                    return []
        # Fewest: drop any victim (the costliest first) the job fits without.
        for p in reversed(list(chosen)):
            rest = [c for c in chosen if c is not p]
            if rest and room(rest):
                chosen = rest
        return chosen

    # ---- growth -------------------------------------------------------------------------
    def grow_elastic(self) -> None:
        """Running elastic jobs below their full size grow into what is left, when nobody of at
        least their priority waits for room and their last resize is grow_cooldown_s ago."""
        top_waiting = max(self.waits_for_room, default=None)
        for job in sorted(self.running, key=lambda j: (-j.priority, j.started_at, j.job_id)):
            full = job.full_workers or max(job.sizes, default=job.workers)
            if (not job.sizes or not job.running or job.releasing_for or job.job_id in self.victims
                    or job.workers >= full or self.now - job.started_at < self.grow_cooldown_s
                    or (top_waiting is not None and top_waiting >= job.priority)
                    or len(job.nodes) != job.demand.workers):
                continue
            room = self._free_with([(job, None)])  # it gives back what it holds and reserves anew
            full_demand = replace(job.demand, workers=full // job.demand.group)
            for size in job_sizes(full_demand, job.sizes):
                if size <= job.workers:
                    break
                demand = job.demand.at(size)
                extra_cpus = demand.total_cpus - job.demand.total_cpus
                extra_gpus = demand.total_gpus - job.demand.total_gpus
                over = self.usage.over_by(job.queue, extra_cpus, extra_gpus)
                if over is not None and not (self.usage.quota(job.queue).borrow and job.preemptible):
                    continue
                if fits(demand, room):
                    self.result.grow.append(Grow(job.job_id, size))
                    self.free = take(demand, room)
                    self.usage.change(job.queue, extra_cpus, extra_gpus)
                    break
