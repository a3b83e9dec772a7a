"""Queues without a cluster: the rules (control/queues.py), the store's table, the scheduler's inputs
built from job records (control/planning.py) and elastic sizes from the strategy (control/elastic.py)."""

from __future__ import annotations

import pytest

from orchestrator.control import queues as rules
from orchestrator.control.elastic import allowed_sizes
from orchestrator.control.planning import inputs, steps_since_checkpoint
from orchestrator.control.record import PreemptionRecord
from orchestrator.control.scheduler import Preemption, QueueQuota
from orchestrator.control.store import JobStore, StateLocation
from orchestrator.errors import UserError
from orchestrator.spec import JobSpec

from ..helpers import job_record

pytestmark = pytest.mark.timeout(60)


def spec(queue="default", workers=2, **resources):
    return {"name": "j", "entrypoint": "tests.jobs.train_fns:gated", "queue": queue,
            "resources": {"workers": workers, **resources}}


# ---- rules ---------------------------------------------------------------------------------------


def test_create_checks_every_value_and_refuses_a_second_queue_of_a_name():
    made = rules.new_queue({}, "research", cpus="8", gpus=None, weight=2, borrow=False)
    assert made == QueueQuota("research", 8.0, None, 2.0, False)
    for bad, words in [(dict(name="Research"), "lower-case"), (dict(cpus="-1"), "--cpus"),
                       (dict(cpus="lots"), "--cpus"), (dict(gpus="inf"), "--gpus"), (dict(weight=0), "--weight")]:
        args = {"name": "x", "cpus": None, "gpus": None, "weight": 1.0, "borrow": True, **bad}
        with pytest.raises(UserError, match=words):
            rules.new_queue({}, args.pop("name"), **args)
    with pytest.raises(UserError, match="already exists; change it with `trainctl queue set research`"):
        rules.new_queue({"research": made}, "research")
    with pytest.raises(UserError, match="already exists"):
        rules.new_queue({}, "default")


def test_set_changes_only_what_is_given_and_none_removes_a_quota():
    q = QueueQuota("research", 8.0, 2.0, 2.0, False)
    assert rules.changed_queue({"research": q}, "research", cpus=16) == QueueQuota("research", 16.0, 2.0, 2.0, False)
    assert rules.changed_queue({"research": q}, "research", gpus="none").gpus is None
    assert rules.changed_queue({}, "default", weight=3) == QueueQuota("default", None, None, 3.0, True)
    with pytest.raises(UserError, match="no queue 'nope'; create it with `trainctl queue create nope`"):
        rules.changed_queue({}, "nope", cpus=1)


def test_delete_is_refused_while_jobs_wait_or_run_in_the_queue():
    queues = {"research": QueueQuota("research", 8.0)}
    waiting = job_record("w", "QUEUED", spec=spec("research"))
    running = job_record("r", "RUNNING", spec=spec("research"))
    done = job_record("d", "SUCCEEDED", spec=spec("research"))
    with pytest.raises(UserError, match="still has 1 waiting and 1 running jobs"):
        rules.check_delete(queues, [waiting, running, done], "research")
    rules.check_delete(queues, [done], "research")
    with pytest.raises(UserError, match="default queue cannot be deleted"):
        rules.check_delete(queues, [], "default")
    with pytest.raises(UserError, match="no queue 'other'"):
        rules.check_delete(queues, [], "other")


def test_submit_to_an_unknown_queue_names_queue_create():
    rules.check_submit({}, "default")
    rules.check_submit({"research": QueueQuota("research")}, "research")
    with pytest.raises(UserError, match="trainctl queue create research"):
        rules.check_submit({}, "research")


def test_describe_counts_what_each_queue_holds():
    queues = {"research": QueueQuota("research", 8.0)}
    jobs = [job_record("a", "RUNNING", spec=spec("research", workers=3, cpus_per_worker=2)),
            job_record("b", "QUEUED", spec=spec("research")),
            job_record("c", "RUNNING", spec=spec(workers=4, min_workers=2), workers=2)]
    rows = {r["name"]: r for r in rules.describe(queues, jobs)}
    assert rows["research"]["used_cpus"] == 6 and rows["research"]["running"] == 1 and rows["research"]["queued"] == 1
    assert rows["default"]["used_cpus"] == 2  # the elastic job holds its current size
    assert rows["default"]["cpus"] is None and rows["default"]["weight"] == 1


# ---- the store -----------------------------------------------------------------------------------


def test_queues_survive_in_the_store(tmp_path):
    store = JobStore(StateLocation.parse(str(tmp_path)))
    store.put_queue(QueueQuota("research", 8.0, None, 2.0, False))
    store.put_queue(QueueQuota("prod", None, 4.0))
    store.put_queue(QueueQuota("prod", None, 2.0, 3.0))  # set: the same row
    store.close()
    again = JobStore(StateLocation.parse(str(tmp_path)))
    assert again.get_queues() == {"research": QueueQuota("research", 8.0, None, 2.0, False),
                                  "prod": QueueQuota("prod", None, 2.0, 3.0, True)}
    again.delete_queue("research")
    assert set(again.get_queues()) == {"prod"}
    again.close()


# ---- scheduler inputs from job records ------------------------------------------------------------


class Node:
    def __init__(self, node_id, cpus, free_cpus, gpus=0.0, free_gpus=0.0):
        self.node_id, self.cpus, self.free_cpus, self.gpus, self.free_gpus = node_id, cpus, free_cpus, gpus, free_gpus


def placement(*nodes):
    return [{"rank": i, "node_id": n, "node_ip": "127.0.0.1", "pid": 1} for i, n in enumerate(nodes)]


def test_inputs_from_records():
    nodes = [Node("head", 4, 1), Node("n2", 4, 0)]
    victim = job_record("v", "RUNNING", spec={**spec(workers=3), "priority": 1}, priority=1,
                        placement=placement("head", "n2", "n2"), started_at=50.0,
                        progress={"step": 40}, checkpoint={"step": 30, "index": 3})
    back = job_record("b", "QUEUED", spec=spec("research"),
                      preemptions=[PreemptionRecord(at=1, by="h").model_dump()])
    preempting = job_record("p", "PREEMPTING", spec=spec(), placement=placement("head", "head"))
    given = inputs([victim, back, preempting, job_record("done", "SUCCEEDED")], nodes, {}, lambda j: (),
                   draining=["n2", "gone"], releasing={"p": Preemption("p", "h", shrink_to=None)})
    assert [n.cpus for n in given.free] == [1, 0] and [n.cpus for n in given.total] == [4, 4]
    assert given.cordoned == frozenset({1})
    (q,) = given.queued
    assert (q.job_id, q.queue, q.preempted_by, q.demand.workers) == ("b", "research", "h", 2)
    v, p = given.running
    assert v.nodes == (0, 1, 1) and v.steps_since_checkpoint == 10 and v.started_at == 50.0 and v.running
    assert v.releasing_for is None
    assert p.releasing_for == "h" and not p.running


def test_inputs_colocated_bundles_and_elastic_size():
    nodes = [Node("a", 8, 0), Node("b", 8, 4)]
    job = job_record("e", "RUNNING", spec=spec(workers=8, min_workers=4, colocate=2), workers=4,
                     placement=placement("a", "a", "b", "b"))
    (r,) = inputs([job], nodes, {}, lambda j: (4, 6, 8)).running
    assert r.demand.workers == 2 and r.demand.group == 2 and r.nodes == (0, 1)
    assert r.sizes == (4, 6, 8) and r.full_workers == 8 and r.workers == 4


def test_a_job_without_placement_is_never_a_victim():
    (r,) = inputs([job_record("s", "STARTING", spec=spec())], [Node("a", 4, 0)], {}, lambda j: ()).running
    assert r.nodes == () and not r.running


def test_steps_since_checkpoint():
    assert steps_since_checkpoint(job_record("x", progress={"step": 7})) == 7
    assert steps_since_checkpoint(job_record("x", progress={"step": 7}, checkpoint={"step": 7})) == 0


# ---- elastic sizes from the strategy -----------------------------------------------------------------


def test_allowed_sizes_fixed_job_has_none():
    assert allowed_sizes(JobSpec.model_validate(spec(workers=4))) == ()
    assert allowed_sizes(JobSpec.model_validate(spec(workers=4, min_workers=4))) == ()


def test_allowed_sizes_ddp_and_colocated_groups():
    assert allowed_sizes(JobSpec.model_validate(spec(workers=4, min_workers=2))) == (2, 3, 4)
    assert allowed_sizes(JobSpec.model_validate(spec(workers=8, min_workers=2, colocate=2))) == (2, 4, 6, 8)


def test_allowed_sizes_follow_a_hybrid_mesh():
    # pp 2 x tp 1 with dp the rest: only even sizes; a fixed dp 2 x pp 2: only 4
    hybrid = {**spec(workers=8, min_workers=3), "strategy": {"name": "hybrid", "options": {"pp": 2}}}
    assert allowed_sizes(JobSpec.model_validate(hybrid)) == (4, 6, 8)
    fixed = {**spec(workers=6, min_workers=2), "strategy": {"name": "hybrid", "options": {"pp": 2, "dp": 2}}}
    assert allowed_sizes(JobSpec.model_validate(fixed)) == (4,)
