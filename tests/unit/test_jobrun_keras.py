"""Early stopping, the best checkpoint and tracking through the attempt loop (control/jobrun.py),
driven by the fake worker group of test_jobrun.py (the same paths on a real cluster:
test_tracking_cluster.py)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.control.jobrun import JobRun, RankExit
from orchestrator.control.states import JobState
from orchestrator.runtime.checkpoint import CheckpointStore
from orchestrator.spec import JobSpec, MetricGoal
from tests.unit.test_jobrun import NEVER, FakeCluster, FakeGroup, _states

from ..helpers import job_record

pytestmark = pytest.mark.timeout(60)

PEAKING = [0.2, 0.5, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3]  # accuracy per epoch: best at epoch 2


def _spec(**fields) -> JobSpec:
    return JobSpec(name="j", entrypoint="tests.jobs.keras_fns:peaks", resources={"workers": 2},
                   early_stop={"metric": "accuracy", "mode": "max", "patience": 2},
                   checkpoint={"keep": 1, "keep_best": {"metric": "accuracy", "mode": "max"}}, **fields)


def _job_run(tmp_path, cluster, spec: JobSpec, **record) -> JobRun:
    job = job_record("j-1", "STARTING", spec=spec, checkpoint_root=str(tmp_path / "ckpt"), **record)
    run = JobRun(job, tmp_path / "logs" / "j-1.log", cluster)
    cluster.run = run
    return run


def _drive(run: JobRun) -> JobRun:
    asyncio.run(asyncio.wait_for(run.main(), 30))
    return run


def peaking_rank(values=PEAKING, steps_per_epoch=10, start_epoch=0, keep=1):
    """Rank 0 reports per-step losses and, each epoch, the accuracy with a committed checkpoint
    (as ctx.report does); then it trains on (NEVER) until torn down."""
    def outcome(run: JobRun, rank: int):
        if rank != 0:
            return NEVER
        task = run.cluster.tasks[-1]
        store = CheckpointStore(task.checkpoint_root, keep=keep, owner=task.owner,
                                keep_best=MetricGoal(metric="accuracy", mode="max"))
        for epoch in range(start_epoch, len(values)):
            step = (epoch + 1) * steps_per_epoch
            run.on_events(0, [("metrics", 0.0, {"step": step - 1, "loss": 1.0})])
            metrics = {"step": step, "epoch": epoch, "accuracy": values[epoch]}
            store.begin(epoch + 1)
            done = store.commit(epoch + 1, {"step": step, "metrics": metrics})
            run.on_events(0, [("metrics", 0.0, metrics),
                              ("checkpoint", 0.0, {"index": done.index, "path": str(done.path), "step": step,
                                                   "bytes": 1, "seconds": 0.1})])
            if run.end_request is not None:
                break
        return NEVER
    return outcome


def test_a_metric_that_peaks_ends_the_job_succeeded_with_the_note_and_keeps_the_best(tmp_path):
    cluster = FakeCluster([[peaking_rank(), peaking_rank()]])
    run = _drive(_job_run(tmp_path, cluster, _spec()))
    assert _states(run) == ["RUNNING", "SUCCEEDED"]
    assert run.history[-1].note == "early stopped at step 50 (best accuracy 0.9 at step 30)"
    assert cluster.groups[0].shut and cluster.released and run.restarts == []
    # keep 1: the newest (epoch 4, index 5) and the best (epoch 2, index 3)
    assert [c.index for c in run.checkpoints.committed()] == [3, 5]
    snap = run.snapshot()
    assert snap.best_checkpoint == {"index": 3, "path": str(tmp_path / "ckpt" / "checkpoint_000003"),
                                    "step": 30, "metric": "accuracy", "value": 0.9}
    assert snap.early_stop["best"] == 0.9 and snap.early_stop["stopped_at"] == 50


def test_checkpoints_a_stopped_rank_left_unpruned_are_pruned_at_the_end(tmp_path):
    """Rank 0 torn down between a commit and its prune (keep=100 stands for that rank)."""
    cluster = FakeCluster([[peaking_rank(keep=100), peaking_rank(keep=100)]])
    run = _drive(_job_run(tmp_path, cluster, _spec()))
    assert [c.index for c in run.checkpoints.committed()] == [3, 5] and run.best_checkpoint["index"] == 3


def test_the_early_stopper_state_survives_a_restart_of_the_job(tmp_path):
    """A new supervisor (head restart) builds its JobRun from the record: counting goes on."""
    state = {"best": 0.9, "best_step": 30, "since_best": 1, "last_step": 40, "stopped_at": None}
    cluster = FakeCluster([[peaking_rank(start_epoch=4), peaking_rank(start_epoch=4)]])
    run = _drive(_job_run(tmp_path, cluster, _spec(), early_stop=state))
    assert run.history[-1].note == "early stopped at step 50 (best accuracy 0.9 at step 30)"


def test_without_early_stop_the_same_job_runs_to_its_end(tmp_path):
    def reports_all_then_returns(run, rank):
        peaking_rank()(run, rank)
        return RankExit(value={})
    cluster = FakeCluster([[reports_all_then_returns, RankExit(value={})]])
    spec = _spec().model_copy(update={"early_stop": None})
    run = _drive(_job_run(tmp_path, cluster, spec))
    assert _states(run) == ["RUNNING", "SUCCEEDED"] and run.history[-1].note == ""


class PostTrainingGroup(FakeGroup):
    def run_on_rank0(self, fn, *args):
        self.cluster.post_training_args = args

        async def done():
            return RankExit(value={"log": [], "report": {"md": "/r/report.md"}, "kept": ["dynamic_int8"],
                                   "rejected": [], "final": {"path": "/r/model"}})
        return done()


class PostTrainingCluster(FakeCluster):
    async def start_group(self, timeout_s):
        group = PostTrainingGroup(self, self.attempts[min(len(self.groups), len(self.attempts) - 1)])
        self.groups.append(group)
        return group


@pytest.mark.parametrize("which, index", [("best", 3), ("last", 5)])
def test_post_training_starts_from_the_checkpoint_it_is_told(tmp_path, which, index):
    cluster = PostTrainingCluster([[peaking_rank(), peaking_rank()]])
    spec = _spec(post_training={"passes": [{"quantize": {"method": "dynamic_int8"}}], "checkpoint": which})
    run = _drive(_job_run(tmp_path, cluster, spec))
    assert _states(run) == ["RUNNING", "POST_TRAINING", "SUCCEEDED"]
    assert cluster.post_training_args[1] == str(tmp_path / "ckpt" / f"checkpoint_{index:06d}")
    assert run.history[1].note == f"early stopped at step 50 (best accuracy 0.9 at step 30); 1 passes on checkpoint {index}"


def test_tensorboard_files_are_written_under_the_job_directory(tmp_path, monkeypatch):
    from orchestrator.control import jobrun
    from tests.multiprocess.test_tracking import scalars

    monkeypatch.setattr(jobrun, "TRACKING_CLOSE_S", 120.0)  # a short job: the end waits for tensorboard's import

    cluster = FakeCluster([[peaking_rank(), peaking_rank()]])
    run = _drive(_job_run(tmp_path, cluster, _spec(tracking={"tensorboard": True})))
    assert run.state is JobState.SUCCEEDED
    curves = scalars(tmp_path / "ckpt" / "tensorboard")  # the job ended: everything is written
    assert curves["accuracy"] == [(10, pytest.approx(0.2)), (20, 0.5), (30, pytest.approx(0.9)),
                                  (40, pytest.approx(0.7)), (50, pytest.approx(0.6))]
    assert [s for s, _ in curves["loss"]] == [9, 19, 29, 39, 49]
