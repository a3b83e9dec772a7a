"""An MLflow parent run per sweep (when its base job has `tracking.mlflow`): opened at submit,
its id given to every trial as `tracking.mlflow.parent_run_id` (each trial's own run, made by
control/tracking.py, nests under it), ended with the sweep with its best value and trial, and
the report of its post-training job (sweep/post.py) as artifacts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .record import SweepRecord, SweepState

log = logging.getLogger(__name__)

_STATUS = {SweepState.SUCCEEDED: "FINISHED", SweepState.FAILED: "FAILED", SweepState.CANCELLED: "KILLED"}


def _client(uri: str):
    # a dead server must not hold the caller for minutes (MLflow retries 7 times by default)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_parent_run(base: dict, sweep: dict) -> str | None:
    """Create the sweep's run and point the base job's runs at it (edits `base`); None without MLflow."""
    options = (base.get("tracking") or {}).get("mlflow")
    if not options:
        return None
    client = _client(options["uri"])
    experiment = client.get_experiment_by_name(options["experiment"])
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(options["experiment"])
    run = client.create_run(experiment_id, run_name=sweep["name"],
                            tags={"trainctl.sweep": sweep["name"], "trainctl.search": sweep["search"]})
    run_id = run.info.run_id
    for path, parameter in sweep["parameters"].items():
        client.log_param(run_id, path, {k: v for k, v in parameter.items() if v is not None and v is not False})
    client.log_param(run_id, "objective", f"{sweep['objective']['metric']} ({sweep['objective']['mode']})")
    options["parent_run_id"] = run_id
    return run_id


def close_parent_run(record: SweepRecord) -> None:
    """End the sweep's run with the sweep (never raises: tracking must not stop the controller)."""
    options = (record.base.get("tracking") or {}).get("mlflow") or {}
    run_id = options.get("parent_run_id")
    if not run_id:
        return
    try:
        client = _client(options["uri"])
        if record.best is not None:
            best = record.trial(record.best)
            client.log_metric(run_id, f"best_{record.spec['objective']['metric']}", best.value)
            client.set_tag(run_id, "trainctl.best_trial", best.name)
            if best.checkpoint:
                client.set_tag(run_id, "trainctl.best_checkpoint", best.checkpoint)
        post = record.post_training
        if post is not None and post.report:  # the sweep's post-training job's report files
            client.set_tag(run_id, "trainctl.post_training_job", post.job_id)
            for path in (p for p in (post.report.get("files") or {}).values() if isinstance(p, str)):
                if Path(path).is_file():
                    client.log_artifact(run_id, path, "post_training")
        client.set_terminated(run_id, status=_STATUS[record.state])
    except Exception:
        log.warning("sweep %s: could not end its MLflow run %s", record.id, run_id, exc_info=True)
