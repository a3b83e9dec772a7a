"""End to end on a simulated 2-node Ray cluster: a real 2-rank job whose score peaks is early
stopped, keeps its best checkpoint, writes TensorBoard files (read back with tensorboard's own
reader) and logs an MLflow run (checked through MlflowClient on a real tracking server)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from orchestrator.client.render import print_status
from tests.multiprocess.test_tracking import scalars

from ..helpers import job_spec

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]  # a loaded 2-core machine: 3.5 min seen


def test_a_peaking_score_stops_early_keeps_the_best_and_is_tracked(client, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = job_spec(
        "peaks", "tests.jobs.keras_fns:peaks", tmp_path,
        config={"steps": 3, "peak": 2, "step_s": 0.05},
        checkpoint={"keep": 1, "keep_best": {"metric": "score", "mode": "max"}},
        early_stop={"metric": "score", "mode": "max", "patience": 2},
        tracking={"tensorboard": True, "mlflow": {"uri": mlflow_uri, "experiment": "cluster"}})
    job = client.wait(client.submit(spec), timeout_s=240)

    # early stopping: two epochs' scores after the peak (epoch 2, step 9) did not beat it
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["history"][-1]["note"] == "early stopped at step 15 (best score 1 at step 9)"
    assert job["metrics"]["step"] < 200 * 3  # far from the fallback end of the function

    # keep_best: the peak's checkpoint (index 3) stays besides the newest one
    best = job["best_checkpoint"]
    assert (best["index"], best["step"], best["metric"], best["value"]) == (3, 9, "score", 1.0)
    root = tmp_path / "runs" / job["id"]
    committed = sorted(p.name for p in root.glob("checkpoint_*") if not p.name.endswith(".partial"))
    # the newest: epoch 3's (index 4) at least; epoch 4's save (index 5) may have been cut short by the stop
    assert committed[0] == "checkpoint_000003" and len(committed) == 2 and committed[1] >= "checkpoint_000004"

    # TensorBoard: rank 0's metrics and every rank's step time, under the job's directory
    curves = scalars(root / "tensorboard")
    assert (9, 1.0) in curves["score"] and max(s for s, _ in curves["score"]) >= 15
    assert {"step_time_s/rank_0", "step_time_s/rank_1"} <= set(curves)
    assert all(0 < t < 10 for _, t in curves["step_time_s/rank_1"])

    # status names the best checkpoint and prints the tensorboard line
    out = io.StringIO()
    print_status(Console(file=out, width=250), client.get(job["id"]))
    text = out.getvalue()
    assert f"best       {root / 'checkpoint_000003'} (score 1 at step 9)" in text
    assert f"tensorboard --logdir {root / 'tensorboard'}" in text

    # MLflow: one run for the job, ended with it, the config as params, the metrics with steps
    mlflow = MlflowClient(mlflow_uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("cluster").experiment_id],
                               f"tags.`trainctl.job_id` = '{job['id']}'")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"steps": "3", "peak": "2", "step_s": "0.05"}
    assert run.data.tags["trainctl.best_checkpoint"] == str(root / "checkpoint_000003")
    score = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "score")}
    assert score[9] == 1.0 and score[15] == pytest.approx(0.8)
