"""The attempt loop (orchestrator/control/jobrun.py) driven by a fake worker group: every
failure path, fast and without a cluster. (A fake stands in for Ray here on purpose: the
end-to-end behaviour of each path is covered on real clusters in the job, crash-visibility,
hang and node-loss tests.)"""

from __future__ import annotations

import asyncio

import pytest

from cluster.stacks import Frame, StackDump
from orchestrator.control import jobrun
from orchestrator.control.jobrun import JobRun, RankExit
from orchestrator.errors import NonRetryableError
from orchestrator.runtime.checkpoint import CheckpointStore, CheckpointWriteError
from orchestrator.runtime.reporting import PostMortem, SpoolInfo
from orchestrator.spec import JobSpec
from tests.helpers import job_record

NEVER = "never"  # a rank that does not finish (hung)


@pytest.fixture(autouse=True)
def _short_peer_grace(monkeypatch):
    monkeypatch.setattr(jobrun, "PEER_FAILURE_GRACE_S", 0.05)  # peers that never finish: don't wait 5 s


class FakeGroup:
    def __init__(self, cluster: FakeCluster, outcomes: list):
        self.cluster, self.outcomes = cluster, outcomes
        self.shut = False

    def placement(self) -> list[dict]:
        return [{"rank": r, "node_id": f"node-{r}", "node_ip": f"10.0.0.{r}", "pid": 100 + r}
                for r in range(len(self.outcomes))]

    def run(self, fn, args):
        task = args[0]
        self.cluster.tasks.append(task)
        return [self._outcome(rank, outcome) for rank, outcome in enumerate(self.outcomes)]

    async def _outcome(self, rank, outcome):
        await asyncio.sleep(0)
        if callable(outcome):
            outcome = outcome(self.cluster.run, rank)
        if outcome == NEVER:
            await asyncio.Event().wait()
        return outcome

    def run_on_rank0(self, fn, *args):
        raise AssertionError("no post-training in these jobs")

    def shutdown(self) -> None:
        self.shut = True


class FakeCluster:
    """Attempts play out as scripted: one list of per-rank outcomes per attempt."""

    def __init__(self, attempts: list[list], dead_nodes=(), spool_text: str = "", reservable: int = 99):
        self.attempts, self.dead_nodes, self.spool_text = list(attempts), set(dead_nodes), spool_text
        self.reservable = reservable  # how many groups can be had
        self.rank_handle = None
        self.tasks, self.groups, self.released = [], [], False
        self.run: JobRun | None = None

    async def start_group(self, timeout_s):
        if len(self.groups) >= self.reservable:
            return None
        group = FakeGroup(self, self.attempts[len(self.groups)])
        self.groups.append(group)
        return group

    def node_alive(self, node_id):
        return node_id not in self.dead_nodes

    async def read_spool(self, node_id, path, offset):
        return PostMortem(self.spool_text, 0)

    async def dump_stacks(self, targets):
        def frames(pid):
            if pid == 101:
                return (Frame("stuck", "/job/train.py:28"), Frame("train", "/job/train.py:40"))
            return (Frame("all_reduce", "/x/site-packages/torch/distributed/c10d.py:9"),
                    Frame("train", "/job/train.py:14"))
        return [StackDump(pid, "...", frames(pid)) for _, pid in targets]

    def release(self):
        self.released = True


def _run(tmp_path, cluster: FakeCluster, restarts: list | None = None, **failure) -> JobRun:
    spec = JobSpec(name="j", entrypoint="tests.jobs.train_fns:gated", resources={"workers": 2},
                   failure={"max_restarts": 2, **failure})
    job = job_record("j-1", "STARTING", spec=spec, restarts=restarts or [],
                     checkpoint_root=str(tmp_path / "ckpt"))
    run = JobRun(job, tmp_path / "logs" / "j-1.log", cluster)
    cluster.run = run
    return run


def _drive(run: JobRun, timeout_s: float = 10.0) -> JobRun:
    asyncio.run(asyncio.wait_for(run.main(), timeout_s))
    return run


def _states(run: JobRun) -> list[str]:
    return [h.state.value for h in run.history]


OK = RankExit(value={"step": 10})


def test_a_job_that_succeeds_runs_once_and_releases_its_gang(tmp_path):
    cluster = FakeCluster([[OK, OK]])
    run = _drive(_run(tmp_path, cluster))
    assert _states(run) == ["RUNNING", "SUCCEEDED"] and run.restarts == []
    assert cluster.released and cluster.groups[0].shut


def test_an_error_restarts_from_the_last_checkpoint(tmp_path):
    def save_then_fail(run, rank):
        if rank == 0:
            store = CheckpointStore(run.checkpoints.root, owner=cluster.tasks[-1].owner)
            store.begin(1)
            store.commit(1, {"step": 7})
            return RankExit(error=RuntimeError("loss is nan"))
        return NEVER  # its peer is torn down with the group
    cluster = FakeCluster([[save_then_fail, save_then_fail], [OK, OK]])
    run = _drive(_run(tmp_path, cluster))
    assert _states(run) == ["RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"]
    [restart] = run.restarts
    assert restart.kind == "error" and restart.cause == "rank 0: error: RuntimeError: loss is nan"
    assert restart.from_checkpoint == 1
    first, second = cluster.tasks
    assert (first.attempt, second.attempt) == (0, 1) and second.resume_path.endswith("checkpoint_000001")
    assert first.owner != second.owner  # the new attempt claimed the checkpoints
    assert cluster.groups[0].shut


def test_a_non_retryable_error_fails_at_once(tmp_path):
    cluster = FakeCluster([[RankExit(error=NonRetryableError("bad labels")), OK]])
    run = _drive(_run(tmp_path, cluster))
    assert _states(run) == ["RUNNING", "FAILED"] and run.restarts == []
    assert run.error == "rank 0: fatal: NonRetryableError: bad labels"


def test_restarts_stop_at_max_restarts_but_head_restarts_are_not_counted(tmp_path):
    boom = [RankExit(error=RuntimeError("boom")), OK]
    run = _drive(_run(tmp_path, FakeCluster([boom] * 5), max_restarts=1,
                      restarts=[{"kind": "head_restarted", "cause": "the head restarted", "at": 0, "attempt": 0}]))
    assert [r.kind for r in run.restarts] == ["head_restarted", "error"]  # one counted restart
    assert _states(run)[-1] == "FAILED" and run.error == "rank 0: error: RuntimeError: boom"


def test_a_rank_killed_by_a_signal_is_named_from_its_crash_report(tmp_path):
    def starts_then_dies(run, rank):
        run.on_events(rank, [("rank_started", 0.0, SpoolInfo(f"/tmp/spool-{rank}", 0))])
        return RankExit(died="Worker exit type: SYSTEM_ERROR") if rank == 1 else NEVER
    crash = "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n  File \"train.py\", line 3\n"
    cluster = FakeCluster([[starts_then_dies, starts_then_dies], [OK, OK]], spool_text=crash)
    run = _drive(_run(tmp_path, cluster))
    [restart] = run.restarts
    assert restart.kind == "worker_died"
    assert restart.cause == "rank 1 killed by SIGSEGV (see trainctl logs j-1 --rank 1)"
    assert "[rank 1] Fatal Python error: Segmentation fault" in run.log_path.read_text()


def test_a_lost_node_is_a_node_loss_not_a_crash(tmp_path):
    cluster = FakeCluster([[OK, RankExit(died="connection lost", unreachable=True)], [OK, OK]],
                          dead_nodes={"node-1"})
    run = _drive(_run(tmp_path, cluster))
    assert [r.kind for r in run.restarts] == ["node_lost"]
    assert "node 10.0.0.1 (node-1) was lost" in run.restarts[0].cause


def test_a_full_checkpoint_storage_fails_without_burning_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(jobrun, "storage_ready", lambda root, needed: False)
    full = CheckpointWriteError("no space left on device", "/ckpt", 35 << 20, 2 << 20)
    run = _drive(_run(tmp_path, FakeCluster([[RankExit(error=full), RankExit(error=full)]])))
    assert _states(run) == ["RUNNING", "FAILED"] and run.restarts == []
    assert run.error == str(full) and "no space left on device in /ckpt" in run.error


def test_no_capacity_after_a_loss_fails_with_the_reason(tmp_path):
    run = _drive(_run(tmp_path, FakeCluster([[RankExit(error=RuntimeError("x")), OK]], reservable=1),
                      restart_timeout_s=5))
    assert _states(run) == ["RUNNING", "RESTARTING", "FAILED"]
    assert run.error == "could not re-reserve 2 workers within 5s after a loss"


def test_a_hang_dumps_stacks_names_the_culprit_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(jobrun, "HANG_CHECK_S", 0.05)

    def reports_then_hangs(run, rank):
        run.on_events(rank, [("metrics", 0.0, {"step": 1})])
        return NEVER
    cluster = FakeCluster([[reports_then_hangs, reports_then_hangs], [OK, OK]])
    run = _drive(_run(tmp_path, cluster, hang_timeout_s=0.2))
    [restart] = run.restarts
    assert restart.kind == "hang"
    assert restart.cause.startswith("hang: rank 1 ")  # not the peer waiting in all_reduce
    assert "on node 10.0.0.1 (node-1) in stuck (train.py:28); also rank 0" in restart.cause
    assert "in all_reduce (train.py:14)" in restart.cause
    log = run.log_path.read_text()
    assert "[trainctl] rank 0 stack (py-spy, pid 100)" in log and "[trainctl] rank 1 stack (py-spy, pid 101)" in log


def test_cancelling_the_loop_cancels_the_job_and_frees_the_group(tmp_path):
    cluster = FakeCluster([[NEVER, NEVER]])
    run = _run(tmp_path, cluster)

    async def cancel_soon():
        task = asyncio.ensure_future(run.main())
        while run.state.value != "RUNNING":
            await asyncio.sleep(0.01)
        run.cancel_reason = "cancelled by user"
        task.cancel()
        await task  # the loop ends the job itself (CANCELLED), as Supervisor.cancel awaits it

    asyncio.run(asyncio.wait_for(cancel_soon(), 10))
    assert _states(run) == ["RUNNING", "CANCELLED"] and run.history[-1].note == "cancelled by user"
    assert cluster.groups[0].shut and cluster.released


def test_an_end_request_stops_the_ranks_and_ends_the_job_in_its_state(tmp_path):
    """Early stopping and a sweep's pruning end a job whose ranks are still training."""
    from orchestrator.control.jobrun import EndRequest
    from orchestrator.control.states import JobState

    def stop_soon(run, rank):
        if rank == 0:
            run.request_end(EndRequest(JobState.STOPPED, "stopped by sweep s-1 at step 4"))
        return NEVER
    cluster = FakeCluster([[stop_soon, stop_soon]])
    run = _drive(_run(tmp_path, cluster))
    assert _states(run) == ["RUNNING", "STOPPED"] and run.history[-1].note == "stopped by sweep s-1 at step 4"
    assert cluster.groups[0].shut and cluster.released and run.restarts == []
    run.request_end(EndRequest(JobState.SUCCEEDED, "too late"))  # a finished job ignores it
    assert run.state is JobState.STOPPED
