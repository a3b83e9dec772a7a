"""Experiment tracking of one job (the spec's `tracking`): TensorBoard event files and an MLflow
run, written on the supervisor's side from what the ranks report (the ranks never talk to them).

The attempt loop hands events to `JobTracking` without waiting: they go through a bounded queue
to one background thread that runs the sinks, so a slow or dead MLflow server never slows the
job. A sink's failure is logged once (with its traceback) and the job goes on. tensorboard and
mlflow are imported in that thread, only for jobs that ask for them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..spec import JobSpec
from .early_stop import metric_value
from .states import JobState

logger = logging.getLogger(__name__)

# Events waiting for the thread; beyond this (a server far too slow) new ones are dropped.
MAX_PENDING = 10_000
# Keys of a report that are bookkeeping, not curves.
NOT_CURVES = {"step", "samples"}
# How an ended job's MLflow run ends.
MLFLOW_STATUS = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED",
                 JobState.CANCELLED: "KILLED", JobState.STOPPED: "KILLED"}


@dataclass(frozen=True)
class Report:
    """One of rank 0's ctx.report calls: its numeric values at its step."""

    step: int
    at: float
    values: dict[str, float]


@dataclass(frozen=True)
class StepTime:
    """One rank's mean step time over the steps since its previous telemetry payload."""

    rank: int
    step: int
    at: float
    seconds: float


class Sink(Protocol):
    name: str

    def start(self, attempt: int, resume_step: int | None) -> None: ...
    def reports(self, reports: list[Report]) -> None: ...
    def step_times(self, times: list[StepTime]) -> None: ...
    def tag(self, key: str, value: str) -> None: ...
    def artifacts(self, paths: list[str]) -> None: ...
    def end(self, state: JobState) -> None: ...


_IMPORTING = threading.Lock()  # two threads importing mlflow at once can see it half-initialised


def _need(module: str, package: str):
    """The module, or an ImportError that says how to install it on the head."""
    import importlib

    try:
        with _IMPORTING:
            return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{package} is not installed where the job's supervisor runs (the head): "
                          f"pip install 'trainctl[tracking]' ({exc})") from None


def tensorboard_dir(checkpoint_root: str | Path) -> Path:
    """Where a job's event files go: <checkpoint.storage>/<job id>/tensorboard."""
    return Path(checkpoint_root) / "tensorboard"


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"opt": {"lr": 0.1}} -> {"opt.lr": 0.1}: a nested config as MLflow parameters."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def reports_in(rank: int, events: list) -> tuple[list[Report], list[StepTime]]:
    """What the sinks take from one push of a rank's events: rank 0's reports, every rank's step time."""
    reports, times = [], []
    for kind, at, payload in events:
        if kind == "metrics" and rank == 0 and isinstance(payload.get("step"), int):
            values = {k: v for k in payload if k not in NOT_CURVES
                      and (v := metric_value(payload, k)) is not None}
            reports.append(Report(payload["step"], at, values))
        elif kind == "telemetry" and isinstance(payload.get("step"), int):
            hist = payload.get("step_h") or {}
            if hist.get("n"):
                times.append(StepTime(rank, payload["step"], at, hist["s"] / hist["n"]))
    return reports, times


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.writer = None

    def start(self, attempt: int, resume_step: int | None) -> None:
        SummaryWriter = _need("torch.utils.tensorboard", "tensorboard").SummaryWriter

        if self.writer is not None:
            self.writer.close()
        # A restarted attempt redoes the steps after its checkpoint: TensorBoard then hides
        # what the earlier attempt wrote for them (purge_step), so each curve is one line.
        purge = (resume_step or 0) + 1 if attempt > 0 else None
        self.writer = SummaryWriter(str(self.logdir), purge_step=purge)

    def _writer(self):
        if self.writer is None:  # events before any attempt started (or after its start failed)
            self.start(0, None)
        return self.writer

    def reports(self, reports: list[Report]) -> None:
        writer = self._writer()
        for r in reports:
            for key, value in r.values.items():
                writer.add_scalar(key, value, global_step=r.step, walltime=r.at)
        writer.flush()

    def step_times(self, times: list[StepTime]) -> None:
        writer = self._writer()
        for t in times:
            writer.add_scalar(f"step_time_s/rank_{t.rank}", t.seconds, global_step=t.step, walltime=t.at)
        writer.flush()

    def tag(self, key: str, value: str) -> None:
        writer = self._writer()
        writer.add_text(key, value)
        writer.flush()

    def artifacts(self, paths: list[str]) -> None:
        pass  # files stay where they are; the job's directory holds both

    def end(self, state: JobState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowSink:
    """One MLflow run per job, found again by its trainctl.job_id tag after a restart of the
    job (a new supervisor), so a job never has two runs."""

    name = "mlflow"
    MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
    MAX_PARAMS_PER_CALL = 100
    MAX_PARAM_CHARS = 6000

    def __init__(self, job_id: str, spec: JobSpec):
        self.job_id, self.spec = job_id, spec
        self.client = None
        self.run_id: str | None = None

    def start(self, attempt: int, resume_step: int | None) -> None:
        if self.run_id is None:
            self._open_run()
        self.client.set_tag(self.run_id, "trainctl.attempt", str(attempt))

    def _open_run(self) -> None:
        # a dead server must not hold the thread for minutes (MLflow retries 7 times by default)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        _need("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        opts = self.spec.tracking.mlflow
        self.client = client = MlflowClient(tracking_uri=opts.uri)
        experiment_id = experiment_id_of(client, opts.experiment)
        found = client.search_runs([experiment_id], f"tags.`trainctl.job_id` = '{self.job_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"trainctl.job_id": self.job_id, "trainctl.job_name": self.spec.name,
                "trainctl.strategy": self.spec.strategy.name,
                "trainctl.workers": str(self.spec.resources.workers)}
        if opts.parent_run_id:
            tags["mlflow.parentRunId"] = opts.parent_run_id  # a sweep's run: trials nest under it
        self.run_id = client.create_run(experiment_id, tags=tags, run_name=self.job_id).info.run_id
        params = [Param(k, str(v)[: self.MAX_PARAM_CHARS]) for k, v in flatten(self.spec.config).items()]
        for i in range(0, len(params), self.MAX_PARAMS_PER_CALL):
            client.log_batch(self.run_id, params=params[i: i + self.MAX_PARAMS_PER_CALL])

    def reports(self, reports: list[Report]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return  # the run could not be opened (that was logged): retried at the next attempt
        metrics = [Metric(k, v, int(r.at * 1000), r.step) for r in reports for k, v in r.values.items()]
        for i in range(0, len(metrics), self.MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + self.MAX_METRICS_PER_CALL])

    def step_times(self, times: list[StepTime]) -> None:
        pass  # the run holds what the job reports; per-rank timings are /metrics' and TensorBoard's

    def tag(self, key: str, value: str) -> None:
        if self.run_id is not None:
            self.client.set_tag(self.run_id, key, value)

    def artifacts(self, paths: list[str]) -> None:
        for path in paths if self.run_id is not None else []:
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, path, Path(path).name)
            elif Path(path).is_file():
                self.client.log_artifact(self.run_id, path)

    def end(self, state: JobState) -> None:
        # a preempted job (QUEUED) keeps its run open: its next supervisor finds it again
        if self.run_id is not None and state.terminal:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(state, "FAILED"))


def experiment_id_of(client, name: str) -> str:
    """The MLflow experiment's id, created if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def open_mlflow_run(uri: str, experiment: str, name: str, tags: dict[str, str] | None = None,
                    params: dict[str, Any] | None = None) -> str:
    """A run of its own (e.g. a sweep's parent run: its trials pass the id as
    tracking.mlflow.parent_run_id); returns the run id. Blocking: call it off the event loop."""
    _need("mlflow", "mlflow")
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id_of(client, experiment), tags=tags or {}, run_name=name).info.run_id
    flat = [Param(k, str(v)[: MlflowSink.MAX_PARAM_CHARS]) for k, v in flatten(params or {}).items()]
    for i in range(0, len(flat), MlflowSink.MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=flat[i: i + MlflowSink.MAX_PARAMS_PER_CALL])
    return run_id


def end_mlflow_run(uri: str, run_id: str, state: JobState) -> None:
    """End a run opened by open_mlflow_run as a job in `state` would end (FINISHED/FAILED/KILLED)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, MLFLOW_STATUS.get(state, "FAILED"))


def sinks_for(job_id: str, spec: JobSpec, checkpoint_root: str | Path) -> list[Sink]:
    sinks: list[Sink] = []
    if spec.tracking.tensorboard:
        sinks.append(TensorBoardSink(tensorboard_dir(checkpoint_root)))
    if spec.tracking.mlflow is not None:
        sinks.append(MlflowSink(job_id, spec))
    return sinks


class JobTracking:
    """The job's sinks behind one thread. Every method returns at once (see the module doc)."""

    def __init__(self, job_id: str, sinks: list[Sink], note: Callable[[str], None] | None = None):
        self.job_id, self.sinks = job_id, sinks
        self.note = note  # a line for the job's log (JobRun._log)
        self.failed: dict[str, str] = {}  # sink -> its first error
        self.dropped = 0
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self._thread: threading.Thread | None = None
        if sinks:
            self._thread = threading.Thread(target=self._run, name=f"tracking-{job_id}", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    # ---- from the attempt loop -----------------------------------------------------------
    def on_events(self, rank: int, events: list) -> None:
        if not self.enabled:
            return
        reports, times = reports_in(rank, events)
        if reports:
            self._put(("reports", reports))
        if times:
            self._put(("step_times", times))

    def attempt_started(self, attempt: int, resume_step: int | None) -> None:
        self._put(("start", attempt, resume_step))

    def tag(self, key: str, value: str) -> None:
        self._put(("tag", key, value))

    def artifacts(self, paths: list[str]) -> None:
        self._put(("artifacts", list(paths)))

    def close(self, state: JobState, timeout_s: float) -> bool:
        """End every sink (the MLflow run ends in the job's state, if it ended); waits at most
        timeout_s. True when everything queued got written. Once: later calls do nothing."""
        if not self.enabled or self._closed:
            return True
        self._closed = True
        self._put(("end", state), force=True)
        self._thread.join(timeout_s)
        done = not self._thread.is_alive()
        if not done:
            logger.warning("job %s: tracking did not finish within %.0f s; its last events are lost",
                           self.job_id, timeout_s)
        return done

    def _put(self, item: tuple, force: bool = False) -> None:
        if not self.enabled:
            return
        try:
            self._queue.put(item, block=force, timeout=1.0 if force else None)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("job %s: tracking is %d events behind: new ones are dropped",
                               self.job_id, MAX_PENDING)

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # whatever queued up meanwhile goes out in one call per sink
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for kind, batch in _batched(items):
                for sink in self.sinks:
                    self._call(sink, kind, batch)
                if kind == "end":
                    return

    def _call(self, sink: Sink, kind: str, batch: list) -> None:
        try:
            if kind == "reports":
                sink.reports([r for reports in batch for r in reports])
            elif kind == "step_times":
                sink.step_times([t for times in batch for t in times])
            elif kind == "start":
                for attempt, resume_step in batch:
                    sink.start(attempt, resume_step)
            elif kind == "tag":
                for key, value in batch:
                    sink.tag(key, value)
            elif kind == "artifacts":
                sink.artifacts([p for paths in batch for p in paths])
            elif kind == "end":
                sink.end(batch[-1])
        except Exception as exc:
            if sink.name not in self.failed:
                self.failed[sink.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                logger.warning("job %s: %s tracking failed (%s); the job goes on without it where it cannot "
                               "write (logged once)", self.job_id, sink.name, kind, exc_info=True)
                if self.note is not None:
                    self.note(f"[trainctl] {sink.name} tracking failed: {self.failed[sink.name]}; "
                              "the job goes on\n")
            else:
                logger.debug("job %s: %s tracking failed again (%s)", self.job_id, sink.name, kind, exc_info=True)


def _batched(items: list[tuple]) -> list[tuple[str, list]]:
    """Consecutive items of one kind together, in order: [(kind, [args...]), ...]."""
    out: list[tuple[str, list]] = []
    for kind, *args in items:
        arg = args[0] if len(args) == 1 else tuple(args)
        if out and out[-1][0] == kind:
            out[-1][1].append(arg)
        else:
            out.append((kind, [arg]))
    return out
