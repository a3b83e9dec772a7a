"""Every Prometheus metric trainctl exports, defined once.

Naming follows Prometheus: the `trainctl_` prefix, base units (seconds, bytes, ratios
0..1), `_total` on counters, `_seconds` on histograms of durations. Labels are the
job, rank, node and strategy (plus one dimension where a metric needs it: state,
outcome, reason, op) and never the step: a label per step would grow without bound.

Who fills what:
  ranks       aggregate step time, data wait, collectives, samples/tokens, loss, lr and
              GPU memory and utilisation in-process (telemetry.RankMeter; on a GPU without
              syncing the step) and send the sums with their batched reports; the
              supervisor accumulates them (telemetry.JobTelemetry);
  controller  renders these and its own job table into one /metrics endpoint
              (exporter.py), and drops a job's series `grace` seconds after it ended.

The Grafana dashboards in cluster/monitoring/ are generated from these definitions
(`python -m orchestrator.monitoring.dashboards`), and tests check each other against them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

PREFIX = "trainctl_"

# Label sets by scope. Extra labels (state, outcome, reason, op) are added per metric.
RANK_LABELS = ("job", "strategy", "rank", "node")
JOB_LABELS = ("job", "strategy")
CLUSTER_LABELS: tuple[str, ...] = ()
NODE_LABELS = ("node",)
ALLOWED_LABELS = {"job", "rank", "node", "strategy", "state", "outcome", "reason", "op"}
BUILD_LABELS = ("version", "python_version", "torch_version", "ray_version")

# Histogram bucket upper bounds, in seconds (+Inf is implicit).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
COLLECTIVE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
QUEUE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    gpu: bool = False  # only exported where a rank has a GPU

    @property
    def series_names(self) -> tuple[str, ...]:
        """The sample names this family exposes (what PromQL can select)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        if self.kind == "info":
            return (f"{self.name}_info",)
        return (self.name,)


REGISTRY: dict[str, MetricDef] = {}


def _define(name, kind, help, labels=(), buckets=(), gpu=False) -> MetricDef:
    metric = MetricDef(PREFIX + name, kind, help, tuple(labels), tuple(buckets), gpu)
    REGISTRY[metric.name] = metric
    return metric


# ---- per rank (labels job, strategy, rank, node) ---------------------------------------------
STEP_DURATION = _define("step_duration_seconds", "histogram",
                        "Time of one training step on a rank (between consecutive ctx.report calls, "
                        "checkpoint saves excluded).", RANK_LABELS, STEP_BUCKETS)
SAMPLES = _define("samples_processed_total", "counter",
                  "Samples a rank processed (the `samples` key of ctx.report).", RANK_LABELS)
TOKENS = _define("tokens_processed_total", "counter",
                 "Tokens a rank processed (the `tokens` key of ctx.report).", RANK_LABELS)
LOSS = _define("loss", "gauge", "Latest training loss a rank reported.", RANK_LABELS)
LEARNING_RATE = _define("learning_rate", "gauge",
                        "Latest learning rate a rank reported (`lr` or `learning_rate`).", RANK_LABELS)
DATA_WAIT = _define("data_wait_seconds", "histogram",
                    "Time a rank's training loop waited on its data loader, per step.",
                    RANK_LABELS, WAIT_BUCKETS)
DATA_STALL = _define("data_stall_ratio", "gauge",
                     "Share of recent step time a rank spent waiting on data (0..1, last 30 s).",
                     RANK_LABELS)
COLLECTIVE_DURATION = _define("collective_duration_seconds", "histogram",
                              "Time of collectives called through ctx (all_reduce, broadcast, barrier).",
                              RANK_LABELS + ("op",), COLLECTIVE_BUCKETS)
RANK_STEP = _define("rank_step", "gauge", "The step a rank reported last.", RANK_LABELS)
RANK_LAST_REPORT = _define("rank_last_report_timestamp_seconds", "gauge",
                           "Unix time of a rank's latest report (a hung rank stops advancing).",
                           RANK_LABELS)
GPU_ALLOCATED = _define("gpu_memory_allocated_bytes", "gauge",
                        "GPU memory held by tensors on a rank's device (torch.cuda.memory_allocated).",
                        RANK_LABELS, gpu=True)
GPU_RESERVED = _define("gpu_memory_reserved_bytes", "gauge",
                       "GPU memory reserved by the caching allocator (torch.cuda.memory_reserved).",
                       RANK_LABELS, gpu=True)
GPU_UTILIZATION = _define("gpu_utilization_ratio", "gauge",
                          "Utilisation of a rank's GPU (0..1), from NVML: the `gpu` extra "
                          "(nvidia-ml-py); without it the rank's log says so once.",
                          RANK_LABELS, gpu=True)

# ---- per job (labels job, strategy) ------------------------------------------------------------
JOB_STATE = _define("job_state", "gauge", "1 for the job's current state, 0 for the others.",
                    JOB_LABELS + ("state",))
JOB_STEP = _define("job_step", "gauge", "The job's current step (rank 0's).", JOB_LABELS)
JOB_TOTAL_STEPS = _define("job_total_steps", "gauge", "Steps the job will run, where it said so.",
                          JOB_LABELS)
JOB_THROUGHPUT = _define("job_samples_per_second", "gauge",
                         "Samples per second over the last 10 s, as `trainctl status` shows it.",
                         JOB_LABELS)
JOB_WORKERS = _define("job_workers", "gauge", "Workers (ranks) of the job.", JOB_LABELS)
RESTARTS = _define("job_restarts_total", "counter", "Restarts of the job's worker group, by reason.",
                   JOB_LABELS + ("reason",))
PREEMPTIONS = _define("job_preemptions_total", "counter",
                      "Just-in-time checkpoints after which the job gave its gang back, by reason "
                      "(priority: for a higher-priority job; drain: its node drains; resize: an "
                      "elastic job grew or shrank).", JOB_LABELS + ("reason",))
GOODPUT = _define("job_goodput_ratio", "gauge",
                  "Productive training time / wall time since the job was admitted (0..1).", JOB_LABELS)
PRODUCTIVE = _define("job_productive_seconds_total", "counter",
                     "Training step time that counted (steps redone after a restart excluded).",
                     JOB_LABELS)
WALL = _define("job_wall_seconds", "gauge", "Seconds since the job was admitted (until it ended).",
               JOB_LABELS)
CHECKPOINT_DURATION = _define("checkpoint_save_duration_seconds", "histogram",
                              "Time to save and commit one checkpoint (all ranks).",
                              JOB_LABELS, CHECKPOINT_BUCKETS)
CHECKPOINT_SIZE = _define("checkpoint_size_bytes", "gauge", "Size on disk of the latest checkpoint.",
                          JOB_LABELS)
CHECKPOINT_LAST_SUCCESS = _define("checkpoint_last_success_timestamp_seconds", "gauge",
                                  "Unix time the latest checkpoint was committed.", JOB_LABELS)
CHECKPOINTS = _define("checkpoints_saved_total", "counter", "Checkpoints committed.", JOB_LABELS)

# ---- the cluster ----------------------------------------------------------------------------
JOBS = _define("jobs", "gauge", "Jobs in the job table, by state.", ("state",))
JOBS_FINISHED = _define("jobs_finished_total", "counter", "Jobs that ended, by outcome.", ("outcome",))
WORKERS = _define("workers", "gauge",
                  "Workers of unfinished jobs, by their job's state (QUEUED: waiting for a gang).",
                  ("state",))
QUEUE_LENGTH = _define("queue_length", "gauge", "Jobs waiting in the queue.")
QUEUE_WAIT = _define("queue_wait_seconds", "histogram", "Time from submit to admission.",
                     CLUSTER_LABELS, QUEUE_BUCKETS)
ADMISSION_WAIT = _define("time_to_admission_seconds", "histogram",
                         "Time from entering the queue to each admission: after the submit (reason "
                         "submitted), after a preemption or drain (preempted), after a head restart "
                         "(requeued).", ("reason",), QUEUE_BUCKETS)
NODES = _define("cluster_nodes", "gauge", "Alive Ray nodes.")
NODE_CPUS = _define("node_cpus", "gauge", "CPUs of a node.", NODE_LABELS)
NODE_CPUS_FREE = _define("node_cpus_free", "gauge", "CPUs of a node not reserved.", NODE_LABELS)
NODE_GPUS = _define("node_gpus", "gauge", "GPUs of a node.", NODE_LABELS)
NODE_GPUS_FREE = _define("node_gpus_free", "gauge", "GPUs of a node not reserved.", NODE_LABELS)
BUILD = _define("build", "info", "trainctl and the versions it runs with.", BUILD_LABELS)


# ---- configuration ------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9478
DEFAULT_GRACE_S = 300.0


def enabled() -> bool:
    """The off switch: TRAINCTL_METRICS=0 (in a job's `env:` for its ranks, or for the controller)."""
    return os.environ.get("TRAINCTL_METRICS", "1").strip().lower() not in ("0", "false", "no", "off")


def exporter_options() -> dict:
    """Endpoint options from the environment of whoever creates the controller."""
    return {
        "enabled": enabled(),
        "host": os.environ.get("TRAINCTL_METRICS_HOST", DEFAULT_HOST),
        "port": int(os.environ.get("TRAINCTL_METRICS_PORT", DEFAULT_PORT)),
        "grace_s": float(os.environ.get("TRAINCTL_METRICS_GRACE_S", DEFAULT_GRACE_S)),
    }


# ---- conventions (tests lint the registry with this) ---------------------------------------------
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_NON_BASE_UNITS = ("_milliseconds", "_ms", "_us", "_minutes", "_hours", "_percent", "_kb", "_mb",
                   "_gb", "_kilobytes", "_megabytes", "_bits")


def convention_problems(metric: MetricDef) -> list[str]:
    """What is wrong with a definition by Prometheus' naming rules (empty: nothing)."""
    problems = []
    name = metric.name
    if not name.startswith(PREFIX) or not _NAME.match(name):
        problems.append(f"{name}: must be lower_snake_case with the {PREFIX!r} prefix")
    if metric.kind == "counter" and not name.endswith("_total"):
        problems.append(f"{name}: a counter must end in _total")
    if metric.kind != "counter" and name.endswith("_total"):
        problems.append(f"{name}: only counters end in _total")
    if metric.kind == "histogram" and not name.endswith(("_seconds", "_bytes")):
        problems.append(f"{name}: a histogram must be in a base unit (_seconds, _bytes)")
    if metric.kind == "histogram" and (not metric.buckets or list(metric.buckets) != sorted(metric.buckets)):
        problems.append(f"{name}: histogram buckets must be given, ascending")
    if any(part in name + "_" for part in (u + "_" for u in _NON_BASE_UNITS)):
        problems.append(f"{name}: use base units (seconds, bytes, ratio)")
    if "step" in metric.labels:
        problems.append(f"{name}: never a step label (unbounded cardinality)")
    allowed = ALLOWED_LABELS | (set(BUILD_LABELS) if metric.kind == "info" else set())
    for label in metric.labels:
        if label not in allowed:
            problems.append(f"{name}: label {label!r} is not one of {sorted(allowed)}")
    if name.endswith("_ratio") and metric.kind != "gauge":
        problems.append(f"{name}: a ratio is a gauge")
    return problems


def series_names() -> set[str]:
    """Every sample name the registry exposes."""
    return {s for m in REGISTRY.values() for s in m.series_names}


def build_info() -> dict[str, str]:
    import platform

    def version(dist: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(dist)
        except PackageNotFoundError:
            return "unknown"

    return {"version": version("trainctl"), "python_version": platform.python_version(),
            "torch_version": version("torch"), "ray_version": version("ray")}
