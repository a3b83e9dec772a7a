"""The controller's /metrics endpoint: a prometheus_client collector over the controller's state.

Nothing is copied into prometheus_client metric objects: at each scrape the collector
renders the job table, the node inventory and the supervisors' telemetry snapshots into
metric families (prometheus_client writes the exposition format). A job's series stop
being rendered `grace_s` seconds after it ended, and its telemetry is then forgotten, so
the number of series stays bounded however many jobs ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from ..control.preemption import PREEMPTION_REASONS, admission_waits, preemption_reason
from ..control.record import JobRecord, RunSnapshot
from ..control.states import JobState
from . import metrics as M
from .telemetry import cumulative_buckets, health, new_hist, observe

RESTART_REASONS = ("worker_died", "node_lost", "error", "fatal", "checkpoint_storage", "hang",
                   "head_restarted", "supervisor_lost")
UNFINISHED = [s for s in JobState if not s.terminal]
OUTCOMES = [s for s in JobState if s.terminal]


def _family(metric: M.MetricDef, labels: tuple[str, ...] | None = None):
    labels = list(metric.labels if labels is None else labels)
    if metric.kind == "counter":
        return CounterMetricFamily(metric.name, metric.help, labels=labels)
    if metric.kind == "gauge":
        return GaugeMetricFamily(metric.name, metric.help, labels=labels)
    if metric.kind == "histogram":
        return HistogramMetricFamily(metric.name, metric.help, labels=labels)
    raise ValueError(metric.kind)


def _hist(family, labels: list[str], hist: dict, bounds) -> None:
    family.add_metric(labels, cumulative_buckets(hist, bounds), hist["s"])


class MetricsExporter:
    def __init__(self, jobs: Callable[[], list[JobRecord]], grace_s: float = M.DEFAULT_GRACE_S,
                 clock: Callable[[], float] = time.time):
        self._jobs = jobs
        self.grace_s = grace_s
        self.clock = clock
        self.telemetry: dict[str, dict] = {}  # job id -> the supervisor's latest snapshot
        self.nodes: list = []  # cluster.inventory.NodeCapacity, refreshed by the controller
        self.server = None
        self.endpoint: str | None = None
        self.host: str = M.DEFAULT_HOST  # where /metrics binds, and the controller's HTTP API too
        self._build = M.build_info()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ---- serving -------------------------------------------------------------------------------
    def serve(self, host: str = M.DEFAULT_HOST, port: int = M.DEFAULT_PORT) -> str:
        """Start the HTTP endpoint; a port in use falls back to a free one. Returns its URL."""
        from prometheus_client import start_http_server

        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if port == 0:
                raise
            print(f"[trainctl controller] metrics port {port} unavailable ({exc}); using a free port")
            self.server, _ = start_http_server(0, addr=host, registry=self.registry)
        bound_host, bound_port = self.server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.endpoint = f"http://{shown}:{bound_port}/metrics"
        return self.endpoint

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # ---- fed by the controller ------------------------------------------------------------------
    def observe(self, job: JobRecord, snap: RunSnapshot) -> None:
        """A supervisor snapshot arrived: keep its telemetry."""
        if snap.telemetry:
            self.telemetry[job.id] = snap.telemetry

    def visible(self, job: JobRecord, now: float) -> bool:
        if not job.state.terminal:
            return True
        # ended_at is set when the controller released the job; a job failed while still
        # queued (unschedulable) has only its history
        ended = job.ended_at or (job.history[-1].at if job.history else now)
        return now - ended <= self.grace_s

    def prune(self) -> None:
        """Forget the telemetry of jobs whose grace period is over."""
        now = self.clock()
        jobs = {j.id: j for j in self._jobs()}
        for job_id in list(self.telemetry):
            job = jobs.get(job_id)
            if job is None or not self.visible(job, now):
                self.telemetry.pop(job_id, None)

    # ---- the collector ---------------------------------------------------------------------------
    def describe(self):
        return []

    def collect(self):
        now = self.clock()
        jobs = list(self._jobs())
        yield from self._cluster(jobs)
        live = [j for j in jobs if self.visible(j, now)]
        yield from self._job_families(live, now)
        yield from self._rank_families(live)

    def _cluster(self, jobs: list[JobRecord]):
        build = InfoMetricFamily(M.BUILD.name, M.BUILD.help)  # the sample: <name>_info
        build.add_metric([], self._build)
        yield build
        by_state = {s.value: 0 for s in JobState}
        workers = {s.value: 0 for s in UNFINISHED}
        waits = new_hist(M.QUEUE_WAIT.buckets)
        admissions = {reason: new_hist(M.ADMISSION_WAIT.buckets) for reason in ("submitted", "preempted", "requeued")}
        for job in jobs:
            state = job.state.value
            by_state[state] = by_state.get(state, 0) + 1
            if state in workers:
                workers[state] += job.spec.resources.workers
            if job.started_at:
                observe(waits, M.QUEUE_WAIT.buckets, max(0.0, job.started_at - job.submitted_at))
            for reason, seconds in admission_waits(job.history):
                observe(admissions[reason], M.ADMISSION_WAIT.buckets, seconds)
        fam = _family(M.JOBS)
        for state, n in by_state.items():
            fam.add_metric([state], n)
        yield fam
        fam = _family(M.JOBS_FINISHED)
        for outcome in OUTCOMES:
            fam.add_metric([outcome.value], by_state.get(outcome.value, 0))
        yield fam
        fam = _family(M.WORKERS)
        for state, n in workers.items():
            fam.add_metric([state], n)
        yield fam
        yield GaugeMetricFamily(M.QUEUE_LENGTH.name, M.QUEUE_LENGTH.help, value=by_state["QUEUED"])
        fam = _family(M.QUEUE_WAIT)
        _hist(fam, [], waits, M.QUEUE_WAIT.buckets)
        yield fam
        fam = _family(M.ADMISSION_WAIT)
        for reason, hist in admissions.items():
            _hist(fam, [reason], hist, M.ADMISSION_WAIT.buckets)
        yield fam
        nodes = list(self.nodes)
        yield GaugeMetricFamily(M.NODES.name, M.NODES.help, value=len(nodes))
        for metric, attr in ((M.NODE_CPUS, "cpus"), (M.NODE_CPUS_FREE, "free_cpus"),
                             (M.NODE_GPUS, "gpus"), (M.NODE_GPUS_FREE, "free_gpus")):
            fam = _family(metric)
            for node in nodes:
                fam.add_metric([node.node_id[:12]], getattr(node, attr))
            yield fam

    def _job_families(self, jobs: list[JobRecord], now: float):
        fams = {m.name: _family(m) for m in (
            M.JOB_STATE, M.JOB_STEP, M.JOB_TOTAL_STEPS, M.JOB_THROUGHPUT, M.JOB_WORKERS, M.RESTARTS, M.PREEMPTIONS,
            M.GOODPUT, M.PRODUCTIVE, M.WALL, M.CHECKPOINT_DURATION, M.CHECKPOINT_SIZE,
            M.CHECKPOINT_LAST_SUCCESS, M.CHECKPOINTS)}
        for job in jobs:
            base = [job.id, job.strategy_label]
            for state in JobState:
                fams[M.JOB_STATE.name].add_metric(base + [state.value], 1 if job.state is state else 0)
            fams[M.JOB_WORKERS.name].add_metric(base, job.workers or job.spec.resources.workers)
            preempted = dict.fromkeys(PREEMPTION_REASONS, 0)
            for record in job.preemptions:
                preempted[preemption_reason(record)] += 1
            for reason, n in preempted.items():
                fams[M.PREEMPTIONS.name].add_metric(base + [reason], n)
            reasons = dict.fromkeys(RESTART_REASONS, 0)
            for restart in job.restarts:
                reasons[restart.kind] = reasons.get(restart.kind, 0) + 1
            for reason, n in reasons.items():
                fams[M.RESTARTS.name].add_metric(base + [reason], n)
            telemetry = self.telemetry.get(job.id)
            if job.state in (JobState.PENDING, JobState.QUEUED) and telemetry is None:
                continue  # nothing ran yet
            p = job.progress
            fams[M.JOB_STEP.name].add_metric(base, p.get("step") or 0)
            if p.get("total_steps"):
                fams[M.JOB_TOTAL_STEPS.name].add_metric(base, p["total_steps"])
            fams[M.JOB_THROUGHPUT.name].add_metric(base, p.get("samples_per_s") or 0.0)
            h = health(job, telemetry, now)
            fams[M.WALL.name].add_metric(base, h["wall_s"])
            if telemetry is None:
                continue
            fams[M.PRODUCTIVE.name].add_metric(base, h["productive_s"] or 0.0)
            if h["goodput_ratio"] is not None:
                fams[M.GOODPUT.name].add_metric(base, h["goodput_ratio"])
            ckpt = telemetry["checkpoint"]
            if ckpt["h"]["n"]:
                _hist(fams[M.CHECKPOINT_DURATION.name], base, ckpt["h"], M.CHECKPOINT_DURATION.buckets)
                fams[M.CHECKPOINTS.name].add_metric(base, ckpt["h"]["n"])
                fams[M.CHECKPOINT_LAST_SUCCESS.name].add_metric(base, ckpt["at"])
                if ckpt["bytes"] is not None:
                    fams[M.CHECKPOINT_SIZE.name].add_metric(base, ckpt["bytes"])
        yield from fams.values()

    def _rank_families(self, jobs: list[JobRecord]):
        metrics = (M.STEP_DURATION, M.SAMPLES, M.TOKENS, M.LOSS, M.LEARNING_RATE, M.DATA_WAIT,
                   M.DATA_STALL, M.COLLECTIVE_DURATION, M.RANK_STEP, M.RANK_LAST_REPORT,
                   M.GPU_ALLOCATED, M.GPU_RESERVED, M.GPU_UTILIZATION)
        fams = {m.name: _family(m) for m in metrics}
        for job in jobs:
            telemetry = self.telemetry.get(job.id)
            if not telemetry:
                continue
            nodes = {p.rank: p.node_id[:12] for p in job.placement}
            strategy = job.strategy_label
            for rank, r in sorted(telemetry["ranks"].items()):
                labels = [job.id, strategy, str(rank), nodes.get(int(rank), "unknown")]
                _hist(fams[M.STEP_DURATION.name], labels, r["step_h"], M.STEP_DURATION.buckets)
                _hist(fams[M.DATA_WAIT.name], labels, r["wait_h"], M.DATA_WAIT.buckets)
                for op, hist in sorted(r["coll"].items()):
                    _hist(fams[M.COLLECTIVE_DURATION.name], labels + [op], hist, M.COLLECTIVE_DURATION.buckets)
                fams[M.SAMPLES.name].add_metric(labels, r["samples"])
                fams[M.TOKENS.name].add_metric(labels, r["tokens"])
                for metric, value in ((M.LOSS, r["loss"]), (M.LEARNING_RATE, r["lr"]),
                                      (M.DATA_STALL, r.get("stall")), (M.RANK_STEP, r["step"]),
                                      (M.RANK_LAST_REPORT, r["at"])):
                    if isinstance(value, (int, float)):
                        fams[metric.name].add_metric(labels, float(value))
                gpu = r.get("gpu") or {}
                for metric, key in ((M.GPU_ALLOCATED, "allocated"), (M.GPU_RESERVED, "reserved"),
                                    (M.GPU_UTILIZATION, "utilization")):
                    if gpu.get(key) is not None:
                        fams[metric.name].add_metric(labels, gpu[key])
        yield from fams.values()


def start_exporter(jobs: Callable[[], list[JobRecord]], options: dict | None = None) -> MetricsExporter:
    """The controller's exporter, serving unless metrics are switched off."""
    options = {**M.exporter_options(), **(options or {})}
    exporter = MetricsExporter(jobs, grace_s=options["grace_s"])
    exporter.host = options["host"]  # also with metrics off: the HTTP API binds it
    if options["enabled"]:
        exporter.serve(options["host"], options["port"])
    return exporter

