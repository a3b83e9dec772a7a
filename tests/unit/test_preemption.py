"""Preemption, drain and elastic resizes without a cluster: the ranks' agreement on the
just-in-time step (real threads, the real PreemptSignal), TrainContext's save-then-stop, and
every path of the attempt loop (control/jobrun.py) driven by a fake worker group whose ranks
follow the ranks' protocol. (A fake stands in for Ray on purpose; tests/cluster/test_preemption_cluster.py
runs the same paths on a real cluster with gloo ranks.)"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch.nn as nn

from orchestrator.control import jobrun
from orchestrator.control.jobrun import JobRun, RankExit
from orchestrator.control.preemption import JitCheckpoint, PreemptRequest, largest_size
from orchestrator.control.states import JobState
from orchestrator.runtime.checkpoint import CheckpointStore
from orchestrator.runtime.preemption import PROPOSAL_EVENT, Preempted, PreemptSignal, agreed_step
from orchestrator.spec import JobSpec
from tests.helpers import job_record
from tests.unit.test_jobrun import FakeCluster, FakeGroup

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _short_peer_grace(monkeypatch):
    monkeypatch.setattr(jobrun, "PEER_FAILURE_GRACE_S", 0.05)


# ---- the ranks agree on one step, whenever each learns of the request ------------------------
class _InProcessSupervisor:
    """What JobRun does with the ranks' proposals, between threads."""

    def __init__(self, world_size: int):
        self.lock = threading.Lock()
        self.jit: JitCheckpoint | None = None
        self.world_size = world_size

    def push(self, rank, events):
        with self.lock:
            for kind, _, payload in events:
                if kind == PROPOSAL_EVENT:
                    self.jit.on_proposal(rank, payload)
            return self.jit.rank_command() if self.jit is not None else None


def _rank_thread(rank, sup, saved, reports_every, steps):
    """A rank: trains, passes its state every `reports_every` steps; its 'reporter' pushes
    at random moments (the ranks see the request at different steps)."""
    signal, outbox = PreemptSignal(), []
    stop = threading.Event()

    def reporter():
        while not stop.is_set():
            time.sleep(random.uniform(0, 0.004))
            events, outbox[:] = list(outbox), []
            signal.on_reply(sup.push(rank, events), lambda k, p: outbox.append((k, 0.0, p)))

    thread = threading.Thread(target=reporter, daemon=True)
    thread.start()
    try:
        for step in range(1, steps + 1):
            time.sleep(random.uniform(0, 0.002) * (1 + rank))  # ranks at different speeds
            signal.completed(step)
            if step % reports_every == 0 and signal.save_now(step, wait_s=10):
                saved[rank] = step
                return
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("reports_every", [1, 3])
def test_ranks_that_see_the_request_at_different_steps_save_the_same_step(reports_every):
    for trial in range(5):
        sup, saved = _InProcessSupervisor(3), {}
        threads = [threading.Thread(target=_rank_thread, args=(r, sup, saved, reports_every, 10_000))
                   for r in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05 + 0.02 * trial)
        with sup.lock:
            sup.jit = JitCheckpoint(PreemptRequest("preempted by x", "x"), 3, 60, None)
        for t in threads:
            t.join(timeout=30)
        assert len(saved) == 3 and len(set(saved.values())) == 1, saved
        [step] = set(saved.values())
        assert step % reports_every == 0 and step >= sup.jit.save_step


def test_the_common_step_is_one_past_the_furthest_proposal_once_all_proposed():
    assert agreed_step({0: 4, 1: 7}, 3) is None
    assert agreed_step({0: 4, 1: 7, 2: 5}, 3) == 8
    assert largest_size((2, 4, 6), 5) == 4 and largest_size((2, 4), 1) is None


def test_report_saves_just_in_time_then_stops_the_rank(tmp_path):
    from orchestrator.runtime.context import TrainContext
    from strategies import WorkerEnv, get_strategy_class

    class Collected:
        def __init__(self):
            self.events, self.sources, self.preempt = [], [], PreemptSignal()

        def emit(self, kind, payload):
            self.events.append((kind, payload))

    strategy_cls = get_strategy_class("ddp")
    reporter = Collected()
    ctx = TrainContext(WorkerEnv(rank=0, world_size=1), strategy_cls(strategy_cls.parse_options({})),
                       job_id="j", config={}, reporter=reporter, checkpoints=CheckpointStore(tmp_path),
                       resume_from=None, every_n_steps=100)
    model = nn.Linear(2, 1)
    ctx.report({"loss": 1.0}, checkpoint={"model": model})  # step 1: not due (every 100)
    assert not ctx.preempting and ctx._checkpoints.latest() is None
    reporter.preempt.on_reply({"checkpoint_now": True, "save_at": None}, reporter.emit)
    assert ctx.preempting and ("preempt_step", 1) in reporter.events
    reporter.preempt.on_reply({"checkpoint_now": True, "save_at": 2}, reporter.emit)
    with pytest.raises(Preempted):
        ctx.report({"loss": 0.9}, checkpoint={"model": model})  # step 2: saved whatever every_n_steps says
    assert ctx._checkpoints.latest().step == 2


# ---- the attempt loop ------------------------------------------------------------------------
class SimGroup(FakeGroup):
    """A fake group whose outcomes may be coroutines: ranks that run while the loop watches."""

    async def _outcome(self, rank, outcome):
        await asyncio.sleep(0)
        if callable(outcome):
            outcome = outcome(self.cluster.run, rank)
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome == "never":
            await asyncio.Event().wait()
        return outcome


class SimCluster(FakeCluster):
    def __init__(self, attempts, **kw):
        super().__init__(attempts, **kw)
        self.resized: list[int] = []

    async def start_group(self, timeout_s):
        if len(self.groups) >= self.reservable:
            return None
        group = SimGroup(self, self.attempts[len(self.groups)])
        self.groups.append(group)
        return group

    async def resize(self, workers, timeout_s):
        self.resized.append(workers)
        return True


def sim_rank(start: int = 0, total: int = 10_000, step_s: float = 0.002, checkpoint_every: int | None = 1,
             fail_when_preempting: bool = False, saves: dict | None = None):
    """A rank as the runtime behaves: reports each step, passes its state every
    `checkpoint_every` steps, proposes its step on a request, saves at the agreed step (rank 0
    commits), then returns as a preempted rank does."""
    async def play(run: JobRun, rank: int):
        signal, outbox = PreemptSignal(), []
        emit = lambda kind, payload: outbox.append((kind, time.time(), payload))  # noqa: E731

        def push():
            events, outbox[:] = list(outbox), []
            run.on_events(rank, events)
            signal.on_reply(run.rank_command(), emit)

        owner = run.cluster.tasks[-1].owner
        step = start
        while step < total:
            await asyncio.sleep(step_s * (1 + rank))
            step += 1
            signal.completed(step)
            emit("metrics", {"step": step})
            push()
            if fail_when_preempting and signal.requested.is_set() and rank == 1:
                return RankExit(error=RuntimeError("rank 1 broke while saving"))
            if checkpoint_every is None or step % checkpoint_every:
                continue
            while signal.awaiting_agreement and step > signal.proposal:
                await asyncio.sleep(0.001)  # the training thread waits; its reporter keeps pushing
                push()
            if signal.save_now(step, 0):
                if saves is not None:
                    saves[rank] = step
                if rank == 0:
                    store = CheckpointStore(run.checkpoints.root, owner=owner)
                    index = (store.latest().index + 1) if store.latest() else 1
                    store.begin(index)
                    committed = store.commit(index, {"step": step})
                    run.on_events(0, [("checkpoint", time.time(), {"index": index, "step": step,
                                                                   "path": str(committed.path)})])
                return RankExit(value={"rank": rank, "step": step, "preempted": True})
        return RankExit(value={"rank": rank, "step": step})
    return play


def _run(tmp_path, cluster, state="STARTING", workers=2, **spec_fields) -> JobRun:
    spec = JobSpec(name="j", entrypoint="tests.jobs.train_fns:gated",
                   resources={"workers": workers, **spec_fields.pop("resources", {})},
                   failure={"max_restarts": 2}, **spec_fields)
    job = job_record("j-lo", state, spec=spec, checkpoint_root=str(tmp_path / "ckpt"))
    run = JobRun(job, tmp_path / "logs" / "j-lo.log", cluster)
    cluster.run = run
    return run


def _states(run):
    return [h.state.value for h in run.history]


async def _preempt_once_running(run: JobRun, request: PreemptRequest, after_step: int = 5):
    task = asyncio.ensure_future(run.main())
    while int(run.progress.metrics.get("step", 0) or 0) < after_step:
        await asyncio.sleep(0.005)
    assert run.request_preempt(request)
    assert not run.request_preempt(PreemptRequest("again", "other"))  # the first request stands
    await task


def test_a_preempted_job_saves_just_in_time_and_goes_back_to_the_queue_without_a_restart(tmp_path):
    saves = {}
    cluster = SimCluster([[sim_rank(saves=saves), sim_rank(saves=saves)]])
    run = _run(tmp_path, cluster)
    asyncio.run(asyncio.wait_for(_preempt_once_running(run, PreemptRequest("preempted by j-hi", "j-hi")), 20))
    assert _states(run) == ["RUNNING", "PREEMPTING", "QUEUED"] and run.history[-1].note == "preempted by j-hi"
    assert run.restarts == [] and run.attempt == 0  # not a failure: no restart spent
    assert len(set(saves.values())) == 1 and len(saves) == 2  # both ranks saved one step
    [p] = run.preemptions
    assert p.by == "j-hi" and p.saved and p.step == saves[0] and p.from_checkpoint == 1
    assert cluster.released and cluster.groups[0].shut
    reached = max(run.progress.metrics.get("step", 0), *saves.values())
    assert reached - p.step == 0  # nothing to redo
    # it resumes from that checkpoint: a new supervisor's first attempt starts there
    again = SimCluster([[sim_rank(start=p.step, total=p.step + 3), sim_rank(start=p.step, total=p.step + 3)]])
    job = job_record("j-lo", "STARTING", spec=run.spec, checkpoint_root=str(tmp_path / "ckpt"),
                     preemptions=run.preemptions, history=run.history)
    resumed = JobRun(job, tmp_path / "logs" / "j-lo.log", again)
    again.run = resumed
    asyncio.run(asyncio.wait_for(resumed.main(), 20))
    assert again.tasks[0].resume_path.endswith("checkpoint_000001") and again.tasks[0].attempt == 0
    assert resumed.state is JobState.SUCCEEDED and len(resumed.preemptions) == 1


def test_after_the_grace_period_the_ranks_are_stopped_and_resume_from_the_last_checkpoint(tmp_path):
    def saves_once_then_never_passes_its_state(run, rank):
        if rank == 0:
            store = CheckpointStore(run.checkpoints.root, owner=run.cluster.tasks[-1].owner)
            store.begin(1)
            store.commit(1, {"step": 3})
        return sim_rank(checkpoint_every=None)(run, rank)
    cluster = SimCluster([[saves_once_then_never_passes_its_state] * 2])
    run = _run(tmp_path, cluster, preemption={"grace_s": 0.3})
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(_preempt_once_running(run, PreemptRequest("preempted by j-hi", "j-hi")), 20))
    assert time.monotonic() - started < 10
    assert _states(run) == ["RUNNING", "PREEMPTING", "QUEUED"] and run.restarts == []
    [p] = run.preemptions
    assert not p.saved and p.from_checkpoint == 1 and p.step == 3  # the last one it had
    assert "no just-in-time checkpoint within preemption.grace_s" in run.log_path.read_text()
    assert cluster.groups[0].shut


def test_a_rank_failing_while_preempting_is_a_failure_then_the_job_is_queued(tmp_path):
    cluster = SimCluster([[sim_rank(fail_when_preempting=True), sim_rank(fail_when_preempting=True)]])
    run = _run(tmp_path, cluster)
    asyncio.run(asyncio.wait_for(_preempt_once_running(run, PreemptRequest("preempted by j-hi", "j-hi")), 20))
    assert _states(run) == ["RUNNING", "PREEMPTING", "RESTARTING", "QUEUED"]
    [restart] = run.restarts
    assert restart.kind == "error" and "rank 1 broke while saving" in restart.cause
    assert len(run.preemptions) == 1 and run.state is JobState.QUEUED


def test_a_job_that_finishes_before_its_save_succeeds(tmp_path):
    cluster = SimCluster([[sim_rank(total=8, step_s=0.01, checkpoint_every=None)] * 2])
    run = _run(tmp_path, cluster)
    asyncio.run(asyncio.wait_for(_preempt_once_running(run, PreemptRequest("preempted by j-hi", "j-hi"), 7), 20))
    assert _states(run) == ["RUNNING", "PREEMPTING", "SUCCEEDED"]


def test_a_request_between_attempts_queues_the_job_at_once(tmp_path):
    cluster = SimCluster([[sim_rank(), sim_rank()]])
    run = _run(tmp_path, cluster)
    assert run.request_preempt(PreemptRequest("node 10.0.0.2 drains"))
    asyncio.run(asyncio.wait_for(run.main(), 10))
    assert _states(run) == ["QUEUED"] and cluster.groups == [] and cluster.released


def test_an_elastic_job_grows_through_a_just_in_time_checkpoint_without_a_restart(tmp_path):
    three = [sim_rank(start=0, total=20)] * 3
    cluster = SimCluster([[sim_rank(), sim_rank()], three])
    run = _run(tmp_path, cluster, resources={"min_workers": 1}, workers=3, state="STARTING")
    asyncio.run(asyncio.wait_for(_preempt_once_running(run, PreemptRequest("grows to 3 workers", resize_to=3)), 20))
    assert cluster.resized == [3] and run.workers == 3 and run.restarts == []
    assert _states(run) == ["RUNNING", "PREEMPTING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    assert cluster.tasks[1].resume_path.endswith("checkpoint_000001")
    assert run.preemptions[0].resize_to == 3 and run.preemptions[0].saved


def test_an_elastic_job_shrinks_at_once_on_a_node_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(jobrun, "NODE_DEATH_GRACE_S", 0.1)
    cluster = SimCluster([["never", RankExit(died="connection lost", unreachable=True)],
                          [RankExit(value={"step": 10})]], dead_nodes={"node-1"})
    run = _run(tmp_path, cluster, resources={"min_workers": 1})
    asyncio.run(asyncio.wait_for(run.main(), 20))
    assert cluster.resized == [1] and run.workers == 1
    assert [r.kind for r in run.restarts] == ["node_lost"]
    assert _states(run) == ["RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    assert "elastic: continuing at 1 workers (was 2)" in run.log_path.read_text()


def test_an_elastic_job_shrinks_when_a_peer_error_comes_before_the_node_loss(tmp_path, monkeypatch):
    """gloo's connection reset on the surviving rank is often the first failure seen."""
    cluster = SimCluster([[RankExit(error=RuntimeError("gloo: Connection reset by peer")), "never"],
                          [RankExit(value={"step": 10})]], dead_nodes={"node-1"})
    run = _run(tmp_path, cluster, resources={"min_workers": 1})
    asyncio.run(asyncio.wait_for(run.main(), 20))
    assert cluster.resized == [1] and run.workers == 1 and [r.kind for r in run.restarts] == ["error"]


def test_a_fixed_size_job_does_not_shrink_on_a_node_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(jobrun, "NODE_DEATH_GRACE_S", 0.1)
    cluster = SimCluster([["never", RankExit(died="connection lost", unreachable=True)],
                          [RankExit(value={"step": 10})] * 2], dead_nodes={"node-1"})
    run = _run(tmp_path, cluster)
    asyncio.run(asyncio.wait_for(run.main(), 20))
    assert cluster.resized == [] and run.workers == 2


# ---- what status, list and /metrics show ---------------------------------------------------------
def _preempted_record():
    from orchestrator.control.record import HistoryEntry, PreemptionRecord

    t = 1000.0
    history = [HistoryEntry(state=s, at=t + dt) for s, dt in (
        (JobState.PENDING, 0), (JobState.QUEUED, 0), (JobState.STARTING, 2), (JobState.RUNNING, 3),
        (JobState.PREEMPTING, 10), (JobState.QUEUED, 11), (JobState.STARTING, 16), (JobState.RUNNING, 17))]
    return job_record("j-lo", "RUNNING", history=history, submitted_at=t, preemptions=[
        PreemptionRecord(at=t + 10, by="j-hi", reason="preempted by j-hi", saved=True, from_checkpoint=3,
                         step=42, seconds=1.0),
        PreemptionRecord(at=t + 20, reason="node 10.0.0.2 drains: continues at 1 workers", resize_to=1),
        PreemptionRecord(at=t + 30, reason="grows to 2 workers", resize_to=2)])


def test_admission_waits_and_preemptions_are_exported():
    from prometheus_client import generate_latest

    from orchestrator.control.preemption import admission_waits
    from orchestrator.monitoring.exporter import MetricsExporter

    job = _preempted_record()
    assert admission_waits(job.history) == [("submitted", 2.0), ("preempted", 5.0)]
    text = generate_latest(MetricsExporter(lambda: [job]).registry).decode()
    for reason in ("priority", "drain", "resize"):
        assert f'trainctl_job_preemptions_total{{job="j-lo",reason="{reason}",strategy="ddp"}} 1.0' in text
    assert 'trainctl_time_to_admission_seconds_count{reason="preempted"} 1.0' in text
    assert 'trainctl_time_to_admission_seconds_sum{reason="submitted"} 2.0' in text


def test_status_lists_preemptions_and_list_marks_a_preempted_job():
    import io

    from rich.console import Console

    from orchestrator.client.render import jobs_table, print_status

    job = _preempted_record()
    job.set_state(JobState.PREEMPTING, "preempted by j-top")
    out = io.StringIO()
    console = Console(file=out, width=200)
    print_status(console, job.to_json())
    console.print(jobs_table([job.summary()]))
    text = out.getvalue()
    assert "preempted  3 times (no restart spent)" in text
    assert "preempted by j-hi  (saved step 42 just in time, 1.0s)" in text
    assert "PREEMPTING (grows to 2 workers)" in text  # the list's mark: the last request's words


def test_a_drained_node_is_named_by_id_prefix_or_ip_and_a_typo_is_one_line():
    from cluster.drain import UnknownNode, resolve
    from cluster.inventory import NodeCapacity

    nodes = [NodeCapacity("ab12" + "0" * 52, "10.0.0.1", True, 2, 0, 2, 0),
             NodeCapacity("cd34" + "0" * 52, "10.0.0.2", False, 2, 0, 2, 0)]
    assert resolve("10.0.0.2", nodes) == nodes[1].node_id and resolve("ab12", nodes) == nodes[0].node_id
    with pytest.raises(UnknownNode) as caught:
        resolve("10.0.0.9", nodes)
    assert "\n" not in str(caught.value) and "is no alive node" in str(caught.value)


# ---- the controller's recovery path: asked preemptions and drained nodes, from the store ------
def _controller_after_restart(tmp_path, jobs):
    """The real Controller's scheduling code on a bare instance (no Ray: the actor's __init__
    needs a cluster) with a real store; the test calls the recovery its __init__ runs."""
    from orchestrator.control.controller import Controller
    from orchestrator.control.store import JobStore, StateLocation

    controller = object.__new__(Controller.__ray_actor_class__)
    controller.store = JobStore(StateLocation.parse(str(tmp_path / "state")))
    controller.store.put_many(jobs)
    controller.jobs = {job.id: job for job in controller.store.all()}
    controller.queues, controller._sizes, controller.starvation_s, controller.grow_cooldown_s = {}, {}, 600.0, 300.0
    controller.asked = []

    async def preempt(job, by_job_id, shrink_to=None):
        controller.asked.append((job.id, by_job_id))

    async def admit(job, workers=None):
        controller.asked.append((job.id, "admitted"))

    controller._preempt, controller._admit = preempt, admit
    return controller


def _gang(job_id, state, priority, node, **fields):
    spec = {"name": job_id, "entrypoint": "tests.jobs.train_fns:gated", "priority": priority,
            "resources": {"workers": 1, "cpus_per_worker": 2}, "preemption": {"min_runtime_s": 0}}
    placement = [{"rank": 0, "node_id": node, "node_ip": "127.0.0.1", "pid": 1}] if node else []
    return job_record(job_id, state, spec=spec, priority=priority, placement=placement, started_at=1.0, **fields)


@pytest.mark.parametrize("asked_before_the_restart", [True, False])
def test_a_restarted_controller_picks_no_extra_victim_for_a_preemption_under_way(
        tmp_path, monkeypatch, asked_before_the_restart):
    """`high` waits for `low-a`, which is PREEMPTING for it, when the controller restarts. The
    reloaded ask makes the plan wait for that room; forgotten (the old code kept it in memory
    only), the plan would preempt `low-b` too."""
    from cluster.inventory import NodeCapacity
    from orchestrator.control import controller as controller_module
    from orchestrator.control.scheduler import Preemption

    jobs = [_gang("low-a", "PREEMPTING", 0, "n1"), _gang("low-b", "RUNNING", 0, "n2"),
            _gang("high", "QUEUED", 10, None)]
    nodes = [NodeCapacity("n1", "10.0.0.1", True, 2, 0, 0, 0), NodeCapacity("n2", "10.0.0.2", False, 2, 0, 0, 0)]
    monkeypatch.setattr(controller_module.inventory, "nodes", lambda: nodes)
    controller = _controller_after_restart(tmp_path, jobs)
    if asked_before_the_restart:  # what the controller before the restart stored when it asked
        controller.store.put_preemption(Preemption("low-a", "high"))
    controller._recover_scheduling_state({"n1", "n2"})
    asyncio.run(controller._schedule())
    if asked_before_the_restart:
        assert controller.asked == [] and controller._asked_preemptions == {"low-a": Preemption("low-a", "high")}
    else:
        assert controller.asked == [("low-b", "high")]  # the extra victim the stored ask prevents
    # once the victim gave its gang back, the ask is done: out of memory and out of the store
    controller.jobs["low-a"].set_state(JobState.QUEUED, "preempted by high")
    asyncio.run(controller._schedule())
    assert "low-a" not in controller.store.preemptions() and "low-a" not in controller._asked_preemptions


def test_a_restart_keeps_an_ask_while_its_victim_holds_its_gang(tmp_path):
    """The old controller may die between asking and recording PREEMPTING: the ask is kept
    for a victim still RUNNING in the record (the first tick follows it before planning), and
    dropped for one back in the queue (a head restart requeues every victim) or gone."""
    from orchestrator.control.scheduler import Preemption

    controller = _controller_after_restart(tmp_path, [_gang("just-asked", "RUNNING", 0, "n1"),
                                                      _gang("requeued", "QUEUED", 0, None)])
    for victim in ("just-asked", "requeued", "deleted"):
        controller.store.put_preemption(Preemption(victim, "high"))
    controller._recover_scheduling_state(set())
    assert list(controller._asked_preemptions) == list(controller.store.preemptions()) == ["just-asked"]


def test_a_restarted_controller_keeps_the_drained_nodes_still_alive(tmp_path):
    controller = _controller_after_restart(tmp_path, [])
    controller.store.put_drained_node("n1", 1.0)
    controller.store.put_drained_node("gone", 1.0)  # left the cluster (or restarted: a new id)
    controller._recover_scheduling_state({"n1", "n2"})
    assert controller.draining == {"n1"} and controller.store.drained_nodes() == {"n1"}
    controller._cordon(["n2"])  # e.g. Ray reports it draining: kept for the next restart too
    controller._uncordon_gone({"n2"})  # n1 left the cluster
    assert controller.store.drained_nodes() == controller.draining == {"n2"}


def test_the_grow_cool_down_comes_from_the_environment_and_a_bad_value_is_one_line(monkeypatch):
    from orchestrator.control.controller import grow_cooldown_s
    from orchestrator.errors import UserError

    monkeypatch.delenv("TRAINCTL_GROW_COOLDOWN_S", raising=False)
    assert grow_cooldown_s() is None  # the controller then reads its own (the head's), else 300 s
    monkeypatch.setenv("TRAINCTL_GROW_COOLDOWN_S", "2.5")
    assert grow_cooldown_s() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("TRAINCTL_GROW_COOLDOWN_S", bad)
        with pytest.raises(UserError) as caught:
            grow_cooldown_s()
        assert "\n" not in str(caught.value) and "TRAINCTL_GROW_COOLDOWN_S=300" in str(caught.value)


def test_the_controller_gets_the_cool_down_its_creator_has_when_it_creates_it(monkeypatch):
    """Not a value read when controller.py was imported: Ray ships the actor class pickled by
    value with the globals of the creator's import, so a TRAINCTL_GROW_COOLDOWN_S set later (or
    only on the head) never reached the old controller (the cluster test's growth waited 300 s)."""
    from orchestrator.control import controller as controller_module

    created = {}

    class _Options:
        def remote(self, **kwargs):
            created.update(kwargs)

    monkeypatch.setattr(controller_module.Controller, "options", lambda **_: _Options())
    monkeypatch.setenv("TRAINCTL_GROW_COOLDOWN_S", "3")  # after the import, as a test fixture does
    controller_module.get_or_create_controller()
    assert created["grow_cooldown"] == 3.0
    monkeypatch.delenv("TRAINCTL_GROW_COOLDOWN_S")
    controller_module.get_or_create_controller()
    assert created["grow_cooldown"] is None  # then the controller reads the head's, else 300 s
