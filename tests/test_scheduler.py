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
