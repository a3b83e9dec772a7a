"""orchestrator/control/scheduler.py: gang admission by priority then age, backfill, starvation."""

from __future__ import annotations

import pytest

from orchestrator.control.scheduler import Demand, NodeFree, QueuedJob, fits, plan, slots, take


def job(job_id, workers=1, cpus=1.0, gpus=0.0, placement="pack", priority=0, at=0.0):
    return QueuedJob(job_id, priority, at, Demand(workers, cpus, gpus, placement))


def nodes(*cpus, gpus=None):
    gpus = gpus or [0] * len(cpus)
    return [NodeFree(c, g) for c, g in zip(cpus, gpus, strict=True)]


# ---- order ------------------------------------------------------------------------------


def test_priority_then_age_order():
    cluster = nodes(8)
    queued = [
        job("old-low", priority=0, at=1),
        job("new-high", priority=5, at=30),
        job("old-high", priority=5, at=10),
        job("mid", priority=1, at=5),
    ]
    result = plan(queued, cluster, cluster, now=40)
    assert result.start == ["old-high", "new-high", "mid", "old-low"]
    assert not result.waiting and not result.unschedulable


def test_priority_decides_who_gets_scarce_capacity():
    cluster = nodes(4)
    queued = [
        job("low-old", workers=4, at=0, priority=0),
        job("high-new", workers=4, at=9, priority=1),
    ]
    result = plan(queued, cluster, cluster, now=10)
    assert result.start == ["high-new"]
    assert "low-old" in result.waiting


# ---- gangs ------------------------------------------------------------------------------


def test_job_starts_only_when_whole_gang_fits():
    total = nodes(4, 4)
    free = nodes(2, 1)  # 3 CPUs free, the gang needs 4
    result = plan([job("gang", workers=4)], free, total, now=0)
    assert result.start == []
    assert "gang" in result.waiting and "4 workers" in result.waiting["gang"]
    result = plan([job("gang", workers=4)], nodes(2, 2), total, now=0)
    assert result.start == ["gang"]


def test_two_jobs_that_cannot_both_fit_only_first_starts():
    cluster = nodes(4, 4)
    queued = [job("a", workers=6, at=0), job("b", workers=6, at=1)]
    result = plan(queued, cluster, cluster, now=2)
    assert result.start == ["a"]
    assert set(result.waiting) == {"b"}


def test_jobs_that_fit_together_both_start():
    cluster = nodes(4, 4)
    result = plan([job("a", workers=4, at=0), job("b", workers=4, at=1)], cluster, cluster, now=2)
    assert result.start == ["a", "b"]


# ---- backfill and starvation --------------------------------------------------------------


def test_small_job_backfills_past_blocked_big_one():
    total = nodes(4, 4)
    free = nodes(2, 0)  # something else is running
    queued = [job("big", workers=8, at=0), job("small", workers=2, at=1)]
    result = plan(queued, free, total, now=10, starvation_s=600)
    assert result.start == ["small"]
    assert "big" in result.waiting


def test_nothing_passes_a_job_that_waited_starvation_s():
    total = nodes(4, 4)
    free = nodes(2, 0)
    queued = [job("big", workers=8, at=0), job("small", workers=2, at=1)]
    result = plan(queued, free, total, now=600, starvation_s=600)  # waited exactly starvation_s
    assert result.start == []
    assert set(result.waiting) == {"big", "small"}
    assert "too long" in result.waiting["small"]


def test_just_under_starvation_still_backfills():
    total = nodes(4, 4)
    free = nodes(2, 0)
    queued = [job("big", workers=8, at=0), job("small", workers=2, at=1)]
    assert plan(queued, free, total, now=599.9, starvation_s=600).start == ["small"]


def test_higher_priority_jobs_ahead_of_a_starving_job_still_start():
    total = nodes(4, 4)
    free = nodes(2, 0)
    queued = [
        job("urgent", workers=2, priority=9, at=500),
        job("big", workers=8, at=0),
        job("small", workers=1, at=1),
    ]
    result = plan(queued, free, total, now=1000, starvation_s=600)
    assert result.start == ["urgent"]
    assert set(result.waiting) == {"big", "small"}


def test_unschedulable_job_blocks_nobody():
    total = nodes(4, 4)
    queued = [job("huge", workers=9, at=0, priority=10), job("small", workers=2, at=1)]
    result = plan(queued, total, total, now=10_000, starvation_s=1)
    assert set(result.unschedulable) == {"huge"}
    assert "whole cluster" in result.unschedulable["huge"]
    assert result.start == ["small"]
    assert "huge" not in result.waiting


def test_gpu_job_on_cpu_only_cluster_is_unschedulable():
    total = nodes(64, 64)
    result = plan([job("g", workers=1, gpus=1)], total, total, now=0)
    assert set(result.unschedulable) == {"g"} and result.start == []


# ---- placement ------------------------------------------------------------------------------


def test_strict_spread_needs_distinct_nodes():
    two_nodes = nodes(8, 8)
    assert not fits(Demand(3, 1, placement="strict_spread"), two_nodes)
    assert fits(Demand(2, 1, placement="strict_spread"), two_nodes)
    assert fits(Demand(3, 1, placement="spread"), two_nodes)  # best effort: may share a node
    # a node without room for one worker does not count
    assert not fits(Demand(2, 2, placement="strict_spread"), nodes(8, 1))
    result = plan([job("s", workers=3, placement="strict_spread")], two_nodes, two_nodes, now=0)
    assert set(result.unschedulable) == {"s"}


def test_strict_pack_needs_one_node():
    assert not fits(Demand(4, 1, placement="strict_pack"), nodes(3, 3))
    assert fits(Demand(4, 1, placement="pack"), nodes(3, 3))
    assert fits(Demand(4, 1, placement="strict_pack"), nodes(3, 4))
    result = plan([job("p", workers=4, placement="strict_pack")], nodes(4, 4), nodes(4, 4), now=0)
    assert result.start == ["p"]
    result = plan([job("p", workers=4, placement="strict_pack")], nodes(2, 2), nodes(4, 4), now=0)
    assert "p" in result.waiting


def test_gpu_demand():
    cluster = nodes(8, 8, gpus=[1, 2])
    assert slots(cluster[0], Demand(1, 1, 1)) == 1
    assert slots(cluster[1], Demand(1, 2, 1)) == 2
    assert fits(Demand(3, 1, 1), cluster)
    assert not fits(Demand(4, 1, 1), cluster)
    assert not fits(Demand(2, 1, 1, "strict_pack"), nodes(8, 8, gpus=[1, 1]))
    assert fits(Demand(2, 1, 0.5, "strict_pack"), nodes(8, 8, gpus=[1, 1]))
    result = plan(
        [job("a", workers=2, gpus=1, at=0), job("b", workers=2, gpus=1, at=1)],
        cluster,
        cluster,
        now=2,
    )
    assert result.start == ["a"] and "b" in result.waiting


def test_slots_fractional_cpus():
    assert slots(NodeFree(1.0), Demand(1, 0.5)) == 2
    assert slots(NodeFree(0.99), Demand(1, 0.5)) == 1
    assert slots(NodeFree(0.3), Demand(1, 0.1)) == 3  # 0.3 / 0.1 == 2.9999999999999996 in floats
    assert slots(NodeFree(0.3), Demand(1, 0.5)) == 0
    assert slots(NodeFree(-1.0), Demand(1, 1)) == 0


# ---- take -----------------------------------------------------------------------------------


def test_take_pack_fills_roomiest_node_first():
    assert take(Demand(3, 1), nodes(2, 4)) == nodes(2, 1)
    assert take(Demand(5, 1), nodes(2, 4)) == nodes(1, 0)


def test_take_spread_round_robin():
    assert take(Demand(3, 1, placement="spread"), nodes(4, 2)) == nodes(2, 1)


def test_take_strict_spread_one_per_node():
    assert take(Demand(2, 1, placement="strict_spread"), nodes(4, 0.5, 2)) == nodes(3, 0.5, 1)


def test_take_strict_pack_uses_one_node():
    assert take(Demand(3, 1, placement="strict_pack"), nodes(2, 4)) == nodes(2, 1)


def test_take_gpus():
    left = take(Demand(2, 1, 1), nodes(8, 8, gpus=[4, 0]))
    assert left == nodes(6, 8, gpus=[2, 0])


def test_take_does_not_modify_input():
    free = nodes(4, 4)
    take(Demand(4, 1), free)
    assert free == nodes(4, 4)


@pytest.mark.parametrize("placement", ["pack", "spread", "strict_spread", "strict_pack"])
def test_take_removes_exactly_the_demand(placement):
    demand = Demand(2, 1.5, 1, placement)
    free = nodes(6, 6, 6, gpus=[2, 2, 2])
    assert fits(demand, free)
    left = take(demand, free)
    assert sum(n.cpus for n in left) == pytest.approx(18 - 3)
    assert sum(n.gpus for n in left) == pytest.approx(6 - 2)
    assert all(n.cpus >= 0 and n.gpus >= 0 for n in left)


def test_plan_accounts_for_started_jobs():
    cluster = nodes(4)
    queued = [job("a", workers=3, at=0), job("b", workers=2, at=1), job("c", workers=1, at=2)]
    result = plan(queued, cluster, cluster, now=3)
    assert result.start == ["a", "c"]  # b would need 2 of the 1 CPU left; c backfills
    assert set(result.waiting) == {"b"}


# ==== queues, preemption, elastic sizes (issue 15) ================================================

from dataclasses import replace  # noqa: E402

from orchestrator.control.scheduler import (  # noqa: E402
    Grow,
    QueueQuota,
    RunningJob,
    job_sizes,
)


def qjob(job_id, workers=1, cpus=1.0, priority=0, at=0.0, queue="default", sizes=(), group=1,
         preempted_by=None, preemptible=True):
    demand = Demand(workers // group, cpus * group, 0, "pack", group)
    return QueuedJob(job_id, priority, at, demand, queue=queue, sizes=tuple(sizes),
                     preempted_by=preempted_by, preemptible=preemptible)


def rjob(job_id, nodes=(0,), cpus=1.0, priority=0, started=0.0, queue="default", steps=0,
         preemptible=True, min_runtime_s=0.0, sizes=(), full=None, releasing_for=None,
         shrinking_to=None, running=True, preempted_by=None, group=1):
    demand = Demand(len(nodes), cpus * group, 0, "pack", group)
    return RunningJob(job_id, priority, demand, started, queue=queue, nodes=tuple(nodes),
                      steps_since_checkpoint=steps, preemptible=preemptible, running=running,
                      min_runtime_s=min_runtime_s, sizes=tuple(sizes), full_workers=full,
                      releasing_for=releasing_for, shrinking_to=shrinking_to, preempted_by=preempted_by)


def victims(result):
    return [(p.victim, p.by, p.shrink_to, p.reason) for p in result.preempt]


# ---- preemption: who is the victim ----------------------------------------------------------


def test_high_priority_job_preempts_a_lower_one_that_holds_the_room():
    total = nodes(4)
    running = [rjob("low", nodes=(0, 0, 0, 0), priority=0, started=10)]
    result = plan([qjob("high", workers=4, priority=5, at=20)], nodes(0), total, now=100, running=running)
    assert victims(result) == [("low", "high", None, "priority")]
    assert result.start == [] and "checkpoint and stop (low)" in result.waiting["high"]


def test_victims_lowest_priority_then_least_work_lost_then_youngest():
    total = nodes(4)
    running = [
        rjob("p1", priority=1, started=0), rjob("p0-many-steps", priority=0, steps=50, started=0),
        rjob("p0-few-old", priority=0, steps=5, started=1), rjob("p0-few-young", priority=0, steps=5, started=2),
    ]
    def pick(need):
        return [p.victim for p in plan([qjob("h", workers=need, priority=9, at=3)], nodes(0), total,
                                       now=100, running=running).preempt]
    assert pick(1) == ["p0-few-young"]
    assert pick(2) == ["p0-few-young", "p0-few-old"]
    assert pick(3) == ["p0-few-young", "p0-few-old", "p0-many-steps"]
    assert pick(4) == ["p0-few-young", "p0-few-old", "p0-many-steps", "p1"]


def test_victims_are_the_fewest_that_make_room():
    # the cheapest (priority 0) frees 1 CPU, not enough; the next one alone frees 3: only it goes
    total = nodes(4)
    running = [rjob("tiny", nodes=(0,), priority=0), rjob("big", nodes=(0, 0, 0), priority=1)]
    result = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=100, running=running)
    assert [p.victim for p in result.preempt] == ["big"]


def test_equal_priority_non_preemptible_and_not_running_jobs_are_never_victims():
    total = nodes(3)
    running = [rjob("same", nodes=(0,), priority=5), rjob("pinned", nodes=(0,), preemptible=False),
               rjob("starting", nodes=(0,), running=False)]
    result = plan([qjob("h", priority=5)], nodes(0), total, now=100, running=running)
    assert result.preempt == [] and "waiting for resources" in result.waiting["h"]


def test_no_victims_when_even_all_of_them_would_not_make_room():
    total = nodes(4)
    running = [rjob("low", nodes=(0,)), rjob("pinned", nodes=(0, 0, 0), preemptible=False)]
    result = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=100, running=running)
    assert result.preempt == [] and "waiting for resources" in result.waiting["h"]


def test_min_runtime_protects_a_job_that_just_started():
    total = nodes(2)
    running = [rjob("low", nodes=(0, 0), started=100, min_runtime_s=60)]
    early = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=159, running=running)
    assert early.preempt == [] and "min_runtime_s" in early.waiting["h"]
    later = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=160, running=running)
    assert [p.victim for p in later.preempt] == ["low"]


def test_a_job_waits_without_new_victims_while_its_victims_checkpoint():
    total = nodes(4)
    running = [rjob("low", nodes=(0, 0), releasing_for="h"), rjob("other-low", nodes=(0, 0))]
    result = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=100, running=running)
    assert result.preempt == []
    assert result.waiting["h"] == "waiting for a lower-priority job to checkpoint and stop"


def test_a_job_never_preempts_the_job_that_preempted_it():
    # even if priorities changed since (a resubmit with --priority): no back and forth
    total = nodes(2)
    running = [rjob("a", nodes=(0, 0), priority=0)]
    result = plan([qjob("b", workers=2, priority=5, preempted_by="a")], nodes(0), total, now=100, running=running)
    assert result.preempt == []


def test_a_preempted_job_is_not_readmitted_ahead_of_its_preemptor():
    # the victim is back in the queue and fits on its own; its preemptor still waits for more room
    total = nodes(4)
    queued = [qjob("h", workers=4, priority=9, at=5), qjob("low", workers=2, priority=0, at=0, preempted_by="h")]
    result = plan(queued, nodes(2), total, now=100)
    assert result.start == []
    assert "which preempted it" in result.waiting["low"]
    # once the preemptor starts, the victim may follow in the same tick
    result = plan(queued, nodes(4, 2), nodes(4, 2), now=100)
    assert result.start == ["h", "low"]


def test_room_released_for_a_job_goes_to_it_not_to_a_queue_with_a_lower_share():
    # the victims are back in the queue; 'h' (queue a, which holds more) comes first anyway
    total = nodes(4)
    queues = {"a": QueueQuota("a"), "b": QueueQuota("b")}
    running = [rjob("a-running", nodes=(0,), queue="a")]
    queued = [qjob("b-new", workers=3, queue="b", at=0), qjob("h", workers=3, queue="a", priority=9, at=1),
              qjob("victim", workers=3, queue="a", at=0, preempted_by="h")]
    result = plan(queued, nodes(3), total, now=100, running=running, queues=queues)
    assert result.start == ["h"]


def test_elastic_victim_shrinks_to_its_minimum_instead_of_being_evicted():
    total = nodes(4)
    running = [rjob("elastic", nodes=(0, 0, 0, 0), sizes=(2, 3, 4), full=4)]
    result = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=100, running=running)
    assert victims(result) == [("elastic", "h", 2, "priority")]
    # needing more than the shrink frees: evicted
    result = plan([qjob("h", workers=3, priority=9)], nodes(0), total, now=100, running=running)
    assert victims(result) == [("elastic", "h", None, "priority")]


def test_shrinking_releases_only_what_is_beyond_the_kept_size():
    # a shrinking victim's kept bundles are not counted as room
    total = nodes(4)
    running = [rjob("elastic", nodes=(0, 0, 0, 0), sizes=(2, 4), full=4, releasing_for="h", shrinking_to=2)]
    result = plan([qjob("h", workers=2, priority=9)], nodes(0), total, now=100, running=running)
    assert result.waiting["h"] == "waiting for a lower-priority job to checkpoint and stop"
    # it needs 3: the 2 being released are not enough, so one more victim is chosen
    result = plan([qjob("h", workers=3, priority=9)], nodes(0), nodes(5), now=100,
                  running=running + [rjob("x", nodes=(0,), started=0)])
    assert [p.victim for p in result.preempt] == ["x"]


# ---- no thrash, no loops: a small simulation driving plan() -----------------------------------


class Sim:
    """A one-node cluster driven through plan(): a preempted job's checkpoint is saved by the next
    tick, then it is queued again (keeping its priority and age); each tick is one second of work."""

    def __init__(self, cpus, queues=None):
        self.total = [NodeFree(cpus)]
        self.queues = queues or {}
        self.queued: dict[str, QueuedJob] = {}
        self.submitted: dict[str, QueuedJob] = {}
        self.running: dict[str, RunningJob] = {}
        self.work: dict[str, float] = {}
        self.done: list[str] = []
        self.preemptions: list[tuple[str, str]] = []
        self.now = 0.0

    def submit(self, job_id, workers, priority, work, **kw):
        self.queued[job_id] = self.submitted[job_id] = qjob(job_id, workers=workers, priority=priority,
                                                            at=self.now, **kw)
        self.work[job_id] = work

    def tick(self):
        for job_id, r in list(self.running.items()):
            if r.releasing_for:
                del self.running[job_id]
                self.queued[job_id] = replace(self.submitted[job_id], preempted_by=r.releasing_for)
                continue
            self.work[job_id] -= 1
            if self.work[job_id] <= 0:
                del self.running[job_id]
                self.done.append(job_id)
        used = sum(r.demand.total_cpus for r in self.running.values())
        result = plan(list(self.queued.values()), [NodeFree(self.total[0].cpus - used)], self.total, self.now,
                      running=list(self.running.values()), queues=self.queues)
        for job_id in result.start:
            job = self.queued.pop(job_id)
            self.running[job_id] = rjob(job_id, nodes=(0,) * job.demand.workers, priority=job.priority,
                                        started=self.now, queue=job.queue, preempted_by=job.preempted_by)
        for p in result.preempt:
            self.preemptions.append((p.victim, p.by))
            self.running[p.victim] = replace(self.running[p.victim], releasing_for=p.by)
        self.now += 1
        return result

    def run(self, seconds):
        for _ in range(seconds):
            self.tick()


def test_three_priorities_preempt_downwards_once_each_and_never_loop():
    sim = Sim(cpus=4)
    sim.submit("low", 4, priority=0, work=20)
    sim.run(3)
    sim.submit("mid", 4, priority=5, work=10)
    sim.run(3)
    sim.submit("high", 4, priority=9, work=5)
    sim.run(80)
    assert sim.preemptions == [("low", "mid"), ("mid", "high")]
    assert sim.done == ["high", "mid", "low"]


def test_two_jobs_that_outrank_each_other_do_not_thrash():
    sim = Sim(cpus=2)
    sim.submit("a", 2, priority=0, work=30)
    sim.run(2)
    sim.submit("b", 2, priority=5, work=30)
    sim.run(2)
    assert sim.preemptions == [("a", "b")]
    # 'a' is given a higher priority than 'b' while queued: it still may not preempt 'b'
    sim.queued["a"] = sim.submitted["a"] = replace(sim.queued["a"], priority=9)
    sim.run(80)
    assert sim.preemptions == [("a", "b")]
    assert sim.done == ["b", "a"]


# ---- queues: quota, borrowing, reclaim, fair share ---------------------------------------------


def test_job_within_quota_starts_and_beyond_it_waits_when_the_queue_may_not_borrow():
    total = nodes(16)
    queues = {"research": QueueQuota("research", cpus=8, borrow=False)}
    running = [rjob("r1", nodes=(0,) * 8, queue="research")]
    result = plan([qjob("r2", workers=2, queue="research")], nodes(8), total, now=0, running=running, queues=queues)
    assert result.start == []
    assert result.waiting["r2"] == "queue research is at its quota (8/8 CPUs; the job needs 2), and it may not borrow"
    result = plan([qjob("r2", workers=2, queue="research")], nodes(14), total, now=0,
                  running=running[:0] + [rjob("r1", nodes=(0,) * 6, queue="research")], queues=queues)
    assert result.start == ["r2"]


def test_job_larger_than_a_non_borrowing_quota_is_unschedulable():
    queues = {"small": QueueQuota("small", cpus=2, borrow=False)}
    result = plan([qjob("big", workers=4, queue="small")], nodes(8), nodes(8), now=0, queues=queues)
    assert "quota" in result.unschedulable["big"] and "trainctl queue set small" in result.unschedulable["big"]


def test_queue_borrows_idle_capacity_but_a_non_preemptible_job_does_not():
    total = nodes(16)
    queues = {"research": QueueQuota("research", cpus=8, borrow=True)}
    running = [rjob("r1", nodes=(0,) * 8, queue="research")]
    queued = [qjob("r2", workers=4, queue="research", at=1), qjob("pinned", workers=4, queue="research",
                                                                  at=0, preemptible=False)]
    result = plan(queued, nodes(8), total, now=0, running=running, queues=queues)
    assert result.start == ["r2"]
    assert "non-preemptible job does not borrow" in result.waiting["pinned"]


def test_borrowed_capacity_is_reclaimed_for_the_owner_even_from_a_higher_priority_job():
    total = nodes(16)
    queues = {"research": QueueQuota("research", cpus=8), "prod": QueueQuota("prod", cpus=8)}
    running = [rjob("r-in-quota", nodes=(0,) * 8, queue="research", priority=9, steps=0),
               rjob("r-borrowed", nodes=(0,) * 8, queue="research", priority=9, steps=100)]
    result = plan([qjob("p", workers=4, queue="prod", priority=0)], nodes(0), total, now=100,
                  running=running, queues=queues)
    # only one research job may go: after it, research is back within its quota
    assert len(result.preempt) == 1 and result.preempt[0].reason == "reclaim"
    assert result.preempt[0].by == "p"


def test_no_reclaim_from_a_queue_within_its_quota_nor_for_a_job_beyond_its_own():
    total = nodes(16)
    queues = {"research": QueueQuota("research", cpus=8), "prod": QueueQuota("prod", cpus=8)}
    running = [rjob("r", nodes=(0,) * 8, queue="research", priority=0, started=10),  # younger: cheaper
               rjob("p-old", nodes=(0,) * 8, queue="prod", priority=0, started=0)]
    # prod is at its quota; research is within its own: nothing to reclaim, and priority does not
    # cross into a queue that is within its quota
    result = plan([qjob("p", workers=2, queue="prod", priority=9)], nodes(0), total, now=100,
                  running=running, queues=queues)
    assert [p.victim for p in result.preempt] == ["p-old"]  # its own queue, lower priority


def test_fair_share_between_two_queues_of_equal_priority_follows_the_weights():
    total = nodes(6)
    queues = {"a": QueueQuota("a", weight=2), "b": QueueQuota("b", weight=1)}
    queued = [qjob(f"{q}{i}", queue=q, at=i) for q in "ab" for i in range(10)]
    result = plan(queued, total, total, now=100, queues=queues)
    started = [j[0] for j in result.start]
    assert started.count("a") == 4 and started.count("b") == 2
    # equal weights: an even split
    even = {"a": QueueQuota("a"), "b": QueueQuota("b")}
    started = [j[0] for j in plan(queued, total, total, now=100, queues=even).start]
    assert started.count("a") == 3 and started.count("b") == 3


def test_the_queue_with_the_lower_share_gets_the_next_free_slot_even_behind_an_older_job():
    total = nodes(6)
    queues = {"a": QueueQuota("a"), "b": QueueQuota("b")}
    running = [rjob(f"a-run{i}", queue="a") for i in range(4)]
    queued = [qjob("a-old", queue="a", at=0, priority=0), qjob("b-new", queue="b", at=50, priority=0)]
    result = plan(queued, nodes(1), total, now=100, running=running, queues=queues)
    assert result.start == ["b-new"]
    assert "fair share" in result.waiting["a-old"] and "queue b" in result.waiting["a-old"]


def test_a_queue_within_its_quota_goes_before_one_that_would_borrow():
    total = nodes(8)
    queues = {"a": QueueQuota("a", cpus=4), "b": QueueQuota("b", cpus=4)}
    running = [rjob(f"a-run{i}", queue="a") for i in range(4)]  # a at its quota
    queued = [qjob("a-more", queue="a", at=0, priority=5), qjob("b1", workers=4, queue="b", at=9)]
    result = plan(queued, nodes(4), total, now=100, running=running, queues=queues)
    assert result.start == ["b1"]


# ---- elastic sizes ---------------------------------------------------------------------------------


def test_job_sizes():
    assert job_sizes(Demand(4, 1)) == [4]
    assert job_sizes(Demand(4, 1), (2, 3, 4)) == [4, 3, 2]
    assert job_sizes(Demand(2, 2, group=2), (2, 3, 4)) == [4, 2]  # groups of 2 ranks: even sizes only
    assert job_sizes(Demand(4, 1), (8, 2)) == [2]                  # never above the full size


def test_elastic_job_starts_at_the_largest_size_that_fits():
    total = nodes(4, 4)
    result = plan([qjob("e", workers=8, sizes=range(2, 9))], nodes(3, 2), total, now=0)
    assert result.start == ["e"] and result.sizes["e"] == 5
    fixed = plan([qjob("f", workers=8)], nodes(3, 2), total, now=0)
    assert fixed.start == [] and "waiting for resources" in fixed.waiting["f"]
    full = plan([qjob("f", workers=8)], total, total, now=0)
    assert full.sizes == {"f": 8}


def test_elastic_start_takes_only_sizes_the_mesh_allows():
    # a hybrid job with pp*tp = 2: sizes 2, 4, 6, 8 (computed outside plan from the strategy)
    total = nodes(4, 4)
    result = plan([qjob("h", workers=8, sizes=(2, 4, 6, 8))], nodes(3, 2), total, now=0)
    assert result.sizes["h"] == 4
    # colocated groups of 2 on one node: 3+2 free CPUs hold only two groups
    result = plan([qjob("c", workers=8, group=2, sizes=(2, 4, 6, 8))], nodes(3, 2), total, now=0)
    assert result.sizes["c"] == 4
    result = plan([qjob("c", workers=8, group=2, sizes=(2, 4, 6, 8))], nodes(1, 1), total, now=0)
    assert result.start == [] and "c" in result.waiting


def test_elastic_job_below_its_minimum_waits_and_preempts_only_for_the_minimum():
    total = nodes(4)
    running = [rjob("l1", started=0), rjob("l2", started=1), rjob("l3", started=2)]
    result = plan([qjob("e", workers=4, sizes=(2, 3, 4), priority=9)], nodes(1), total, now=100, running=running)
    assert result.start == [] and [p.victim for p in result.preempt] == ["l3"]


def test_elastic_start_respects_the_quota():
    queues = {"q": QueueQuota("q", cpus=3, borrow=False)}
    result = plan([qjob("e", workers=8, sizes=range(1, 9), queue="q")], nodes(8), nodes(8), now=0, queues=queues)
    assert result.sizes["e"] == 3


def test_elastic_job_grows_into_free_room_after_the_cool_down():
    total = nodes(4)
    running = [rjob("e", nodes=(0, 0), started=0, sizes=(2, 3, 4), full=4)]
    result = plan([], nodes(2), total, now=300, running=running, grow_cooldown_s=300)
    assert result.grow == [Grow("e", 4)]
    assert plan([], nodes(1), total, now=300, running=running, grow_cooldown_s=300).grow == [Grow("e", 3)]
    assert plan([], nodes(2), total, now=299, running=running, grow_cooldown_s=300).grow == []


def test_elastic_job_does_not_grow_while_a_job_of_its_priority_waits_for_room():
    total = nodes(4)
    running = [rjob("e", nodes=(0, 0), started=0, priority=1, sizes=(2, 4), full=4)]
    waiting = qjob("big", workers=3, priority=1, at=0)
    result = plan([waiting], nodes(2), total, now=1000, running=running)
    assert result.grow == [] and "big" in result.waiting
    lower = qjob("low-big", workers=3, priority=0, at=0)
    assert plan([lower], nodes(2), total, now=1000, running=running).grow == [Grow("e", 4)]


def test_queued_jobs_start_before_an_elastic_job_grows():
    total = nodes(4)
    running = [rjob("e", nodes=(0, 0), started=0, priority=5, sizes=(2, 4), full=4)]
    result = plan([qjob("small", workers=1, priority=0)], nodes(2), total, now=1000, running=running)
    assert result.start == ["small"] and result.grow == []  # one CPU left: 3 is not an allowed size


# ---- drain: cordoned nodes ---------------------------------------------------------------------


def test_nothing_new_is_placed_on_a_cordoned_node():
    total = nodes(4, 4)
    result = plan([qjob("a", workers=3)], nodes(4, 4), total, now=0, cordoned=frozenset({0}))
    assert result.start == ["a"]
    result = plan([qjob("a", workers=5)], nodes(4, 4), total, now=0, cordoned=frozenset({0}))
    assert result.start == [] and "a" in result.waiting and not result.unschedulable
    # room a victim frees on a cordoned node is no room
    running = [rjob("low", nodes=(0, 0, 0, 0))]
    result = plan([qjob("h", workers=4, priority=9)], nodes(0, 0), total, now=100, running=running,
                  cordoned=frozenset({0}))
    assert result.preempt == []
