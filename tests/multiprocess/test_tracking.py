"""Tracking sinks (control/tracking.py) without a cluster: TensorBoard files read back with
tensorboard's own reader, an MLflow run checked through MlflowClient on a real tracking server
(started here on 127.0.0.1, sqlite backend), and a failing sink that does not stop the rest."""

from __future__ import annotations

import logging
import time

import pytest

from orchestrator.control.states import JobState
from orchestrator.control.tracking import (
    JobTracking,
    MlflowSink,
    TensorBoardSink,
    end_mlflow_run,
    flatten,
    open_mlflow_run,
    reports_in,
    tensorboard_dir,
)
from orchestrator.spec import JobSpec

pytestmark = pytest.mark.timeout(420)  # mlflow takes minutes to start on a loaded 2-core machine


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve under logdir, as TensorBoard shows it (restarted steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(step, **values):
    return ("metrics", 1000.0 + step, {"step": step, **values})


def _telemetry(step, seconds, n=2):
    return ("telemetry", 1000.0 + step, {"step": step, "step_h": {"s": seconds * n, "n": n}})


def test_reports_in_takes_rank0_metrics_and_every_ranks_step_time():
    events = [_metrics(2, loss=0.5, samples=16, accuracy=0.9, note="text"), _telemetry(2, 0.25),
              ("output", 0.0, {"lines": []})]
    reports, times = reports_in(0, events)
    assert [(r.step, r.values) for r in reports] == [(2, {"loss": 0.5, "accuracy": 0.9})]
    assert [(t.rank, t.step, t.seconds) for t in times] == [(0, 2, 0.25)]
    reports, times = reports_in(1, events)
    assert reports == [] and [t.rank for t in times] == [1]


def test_flatten_nests_with_dots():
    assert flatten({"lr": 0.1, "opt": {"beta": [0.9, 0.99], "eps": {"v": 1}}, "empty": {}}) == \
        {"lr": 0.1, "opt.beta": [0.9, 0.99], "opt.eps.v": 1, "empty": {}}


def test_tensorboard_curves_per_metric_and_rank_and_a_restart_purges_redone_steps(tmp_path):
    logdir = tensorboard_dir(tmp_path / "job")
    tracking = JobTracking("j-1", [TensorBoardSink(logdir)])
    tracking.attempt_started(0, None)
    for step in (1, 2, 3, 4):
        tracking.on_events(0, [_metrics(step, loss=1.0 / step), _telemetry(step, 0.1)])
        tracking.on_events(1, [_metrics(step, loss=9.0), _telemetry(step, 0.3)])  # rank 1's loss: not a curve
    tracking.attempt_started(1, 2)  # resumed from the checkpoint at step 2: steps 3, 4 are redone
    tracking.on_events(0, [_metrics(3, loss=0.5)])
    assert tracking.close(JobState.SUCCEEDED, timeout_s=30)
    curves = scalars(logdir)
    assert curves["loss"] == [(1, 1.0), (2, 0.5), (3, 0.5)]  # the first attempt's 3 and 4 purged
    assert [s for s, _ in curves["step_time_s/rank_1"]] == [1, 2]
    assert curves["step_time_s/rank_0"][0] == (1, pytest.approx(0.1))


class Exploding:
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def __getattr__(self, method):
        def fail(*args):
            self.calls += 1
            raise ConnectionError("server unreachable")
        return fail


def test_a_failing_sink_is_logged_once_and_the_others_go_on(tmp_path, caplog):
    logdir = tmp_path / "tb"
    bad, notes = Exploding(), []
    tracking = JobTracking("j-1", [bad, TensorBoardSink(logdir)], note=notes.append)
    with caplog.at_level(logging.WARNING, logger="orchestrator.control.tracking"):
        tracking.attempt_started(0, None)
        started = time.perf_counter()
        for step in range(1, 6):
            tracking.on_events(0, [_metrics(step, loss=float(step))])
        assert time.perf_counter() - started < 0.5  # the loop never waits for a sink
        assert tracking.close(JobState.FAILED, timeout_s=30)
    assert bad.calls >= 3  # start, reports, end: each tried
    warnings = [r for r in caplog.records if "exploding tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is not None
    assert notes == ["[trainctl] exploding tracking failed: ConnectionError: server unreachable; the job goes on\n"]
    assert [s for s, _ in scalars(logdir)["loss"]] == [1, 2, 3, 4, 5]


def test_no_tracking_starts_no_thread():
    tracking = JobTracking("j-1", [])
    tracking.on_events(0, [_metrics(1, loss=1.0)])
    assert not tracking.enabled and tracking.close(JobState.SUCCEEDED, timeout_s=1)


# ---- MLflow: a real tracking server ---------------------------------------------------------

def _spec(uri: str, **mlflow) -> JobSpec:
    return JobSpec(name="digits", entrypoint="examples.digits.train:train",
                   config={"lr": 0.1, "hidden": 64, "opt": {"momentum": 0.9}},
                   tracking={"mlflow": {"uri": uri, "experiment": "unit", **mlflow}})


def test_mlflow_run_has_params_metrics_artifacts_and_ends_with_the_job(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = open_mlflow_run(mlflow_uri, "sweeps", "sweep-1", params={"space": {"lr": "loguniform"}})
    report = tmp_path / "report.md"
    report.write_text("| pass | kept |\n")
    tracking = JobTracking("digits-abc123", [MlflowSink("digits-abc123", _spec(mlflow_uri, parent_run_id=parent))])
    tracking.attempt_started(0, None)
    for step in (1, 2, 3):
        tracking.on_events(0, [_metrics(step, loss=1.0 / step, accuracy=0.3 * step)])
    tracking.tag("trainctl.best_checkpoint", "/runs/digits-abc123/checkpoint_000003")
    tracking.artifacts([str(report)])
    assert tracking.close(JobState.SUCCEEDED, timeout_s=60)

    [run] = client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                               "tags.`trainctl.job_id` = 'digits-abc123'")
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-abc123"
    assert run.data.params == {"lr": "0.1", "hidden": "64", "opt.momentum": "0.9"}
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["trainctl.best_checkpoint"].endswith("checkpoint_000003")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.md"]
    end_mlflow_run(mlflow_uri, parent, JobState.SUCCEEDED)  # the sweep's own run
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.params == {"space.lr": "loguniform"}


def test_mlflow_a_restarted_job_continues_its_run_and_a_cancel_kills_it(mlflow_uri):
    from mlflow.tracking import MlflowClient

    first = JobTracking("j-again", [MlflowSink("j-again", _spec(mlflow_uri))])
    first.attempt_started(0, None)
    first.on_events(0, [_metrics(1, loss=1.0)])
    assert first.close(JobState.FAILED, timeout_s=60)  # stands for a lost supervisor's last words
    second = JobTracking("j-again", [MlflowSink("j-again", _spec(mlflow_uri))])  # a new supervisor
    second.attempt_started(1, 1)
    second.on_events(0, [_metrics(2, loss=0.5)])
    assert second.close(JobState.CANCELLED, timeout_s=60)
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                               "tags.`trainctl.job_id` = 'j-again'")
    assert run.info.status == "KILLED" and run.data.tags["trainctl.attempt"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_mlflow_unreachable_server_does_not_slow_the_job(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracking = JobTracking("j-down", [MlflowSink("j-down", _spec("http://127.0.0.1:9"))])  # nothing listens
    started = time.perf_counter()
    tracking.attempt_started(0, None)
    for step in range(1, 100):
        tracking.on_events(0, [_metrics(step, loss=1.0)])
    assert time.perf_counter() - started < 0.5
    with caplog.at_level(logging.WARNING, logger="orchestrator.control.tracking"):
        tracking.close(JobState.SUCCEEDED, timeout_s=30)
    assert "mlflow" in tracking.failed


def test_status_names_the_best_checkpoint_and_the_tensorboard_and_mlflow_lines():
    from orchestrator.client.render import tracking_lines

    spec = JobSpec(name="j", entrypoint="m:f", tracking={"tensorboard": True,
                                                          "mlflow": {"uri": "http://127.0.0.1:5000"}})
    job = {"id": "j-1", "spec": spec.model_dump(mode="json"), "checkpoint_root": "/runs/j-1",
           "best_checkpoint": {"index": 3, "path": "/runs/j-1/checkpoint_000003", "step": 30,
                               "metric": "accuracy", "value": 0.9}}
    assert tracking_lines(job) == [
        "  best       /runs/j-1/checkpoint_000003 (accuracy 0.9 at step 30)",
        "  curves     tensorboard --logdir /runs/j-1/tensorboard",
        "  mlflow     http://127.0.0.1:5000  experiment trainctl, run j-1"]
    assert tracking_lines({"id": "j-2", "spec": JobSpec(name="j", entrypoint="m:f").model_dump(mode="json")}) == []


def test_a_preempted_job_keeps_its_mlflow_run_open_and_close_runs_once():
    """QUEUED (preempted) is no end: the run stays RUNNING for the job's next supervisor.
    (A stand-in for MlflowClient records the calls; the real server is tested above.)"""
    class Recorder:
        def __init__(self):
            self.calls = []

        def set_terminated(self, run_id, status):
            self.calls.append((run_id, status))

    sink = MlflowSink("j-1", _spec("http://127.0.0.1:9"))
    sink.client, sink.run_id = Recorder(), "run-1"
    tracking = JobTracking("j-1", [sink])
    assert tracking.close(JobState.QUEUED, timeout_s=10)
    assert tracking.close(JobState.SUCCEEDED, timeout_s=10)  # the second close does nothing
    assert sink.client.calls == []
    sink.end(JobState.STOPPED)
    assert sink.client.calls == [("run-1", "KILLED")]
