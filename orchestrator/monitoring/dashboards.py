"""Grafana dashboards and the Prometheus scrape config, generated from orchestrator/monitoring/metrics.py.

    python -m orchestrator.monitoring.dashboards            # rewrite cluster/monitoring/ (generated files)
    python -m orchestrator.monitoring.dashboards --check    # exit 1 if the committed files differ

Every expression names its metrics through the definitions (M.X.name), so a renamed
metric renames the panels too; tests check that the committed files equal this output,
that every expression references registered metrics only, and (against a real
Prometheus) that every expression parses and returns data.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics as M

MONITORING_DIR = Path(__file__).resolve().parents[2] / "cluster" / "monitoring"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
JOB = 'job="$job"'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    description: str = ""
    width: int = 8
    gpu: bool = False  # only has data where ranks have GPUs
    extra: dict = field(default_factory=dict)


def _quantile(q: float, metric: M.MetricDef, selector: str = "", by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    sel = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric.name}_bucket{sel}[{RATE}])))"


def _mean_rate(metric: M.MetricDef, selector: str, by: str) -> str:
    return (f"sum by ({by}) (rate({metric.name}_sum{{{selector}}}[{RATE}]))"
            f" / sum by ({by}) (rate({metric.name}_count{{{selector}}}[{RATE}]))")


def cluster_panels() -> list[Panel]:
    return [
        Panel("Nodes", [(M.NODES.name, "nodes")], kind="stat", width=4),
        Panel("CPUs free / total", [(f"sum({M.NODE_CPUS_FREE.name})", "free"),
                                    (f"sum({M.NODE_CPUS.name})", "total")], kind="stat", width=4),
        Panel("GPUs free / total", [(f"sum({M.NODE_GPUS_FREE.name})", "free"),
                                    (f"sum({M.NODE_GPUS.name})", "total")], kind="stat", width=4),
        Panel("Queue length", [(M.QUEUE_LENGTH.name, "queued jobs")], kind="stat", width=4),
        Panel("Running jobs", [(f'sum({M.JOB_STATE.name}{{state="RUNNING"}})', "running")],
              kind="stat", width=4),
        Panel("Build", [(f"count by (version, torch_version, ray_version) ({M.BUILD.name}_info)",
                         "trainctl {{version}} torch {{torch_version}} ray {{ray_version}}")],
              kind="stat", width=4),
        Panel("Jobs by state", [(f"sum by (state) ({M.JOBS.name})", "{{state}}")], width=12),
        Panel("Workers by state", [(f"sum by (state) ({M.WORKERS.name})", "{{state}}")], width=12),
        Panel("Free CPUs per node", [(M.NODE_CPUS_FREE.name, "{{node}}")], width=12),
        Panel("Queue wait (p50, p95)", [(_quantile(0.5, M.QUEUE_WAIT), "p50"),
                                        (_quantile(0.95, M.QUEUE_WAIT), "p95")], unit="s", width=12,
              description="Submit to admission; NaN while no job was admitted in the window."),
        Panel("Jobs finished by outcome", [(f"sum by (outcome) ({M.JOBS_FINISHED.name})", "{{outcome}}")],
              width=12),
        Panel("Throughput by job (samples/s)",
              [(f"sum by (job) (rate({M.SAMPLES.name}[{RATE}]))", "{{job}}")], width=12),
        Panel("Goodput by job", [(f"max by (job) ({M.GOODPUT.name})", "{{job}}")], unit="percentunit",
              width=12),
        Panel("Restarts by job and reason (1h)",
              [(f"sum by (job, reason) (increase({M.RESTARTS.name}[1h]))", "{{job}} {{reason}}")],
              width=12),
        Panel("Preemptions by job and reason (1h)",
              [(f"sum by (job, reason) (increase({M.PREEMPTIONS.name}[1h]))", "{{job}} {{reason}}")],
              width=12, description="Just-in-time checkpoints after which a job gave its gang back: "
                                    "for a higher-priority job, a draining node, an elastic resize."),
        Panel("Time to admission (p95) by reason", [(_quantile(0.95, M.ADMISSION_WAIT, by="reason"), "{{reason}}")],
              unit="s", width=12,
              description="Queue to admission, after the submit and after each preemption; NaN while "
                          "no job was admitted in the window."),
    ]


def job_panels() -> list[Panel]:
    mean_step_by_rank = _mean_rate(M.STEP_DURATION, JOB, "rank")
    return [
        Panel("State", [(f"max by (state) ({M.JOB_STATE.name}{{{JOB}}}) == 1", "{{state}}")],
              kind="stat", width=4),
        Panel("Step", [(f"max({M.JOB_STEP.name}{{{JOB}}})", "step")], kind="stat", width=4),
        Panel("Goodput", [(f"max({M.GOODPUT.name}{{{JOB}}})", "goodput")], kind="stat",
              unit="percentunit", width=4,
              description="Productive step time / wall time since admission (restarts, startup, "
                          "checkpoints, evaluation and redone steps are not productive)."),
        Panel("Restarts", [(f"sum({M.RESTARTS.name}{{{JOB}}})", "restarts")], kind="stat", width=4),
        Panel("Progress", [(f"max({M.JOB_STEP.name}{{{JOB}}}) / max({M.JOB_TOTAL_STEPS.name}{{{JOB}}})",
                            "done")], kind="stat", unit="percentunit", width=4,
              description="Where the job called ctx.set_total_steps."),
        Panel("Last checkpoint age",
              [(f"time() - max({M.CHECKPOINT_LAST_SUCCESS.name}{{{JOB}}})", "age")], kind="stat",
              unit="s", width=4),
        Panel("Throughput (samples/s)",
              [(f"sum(rate({M.SAMPLES.name}{{{JOB}}}[{RATE}]))", "samples/s"),
               (f"max({M.JOB_THROUGHPUT.name}{{{JOB}}})", "samples/s (trainctl status)")]),
        Panel("Tokens/s", [(f"sum(rate({M.TOKENS.name}{{{JOB}}}[{RATE}]))", "tokens/s")]),
        Panel("Step time (p50, p95)", [(_quantile(0.5, M.STEP_DURATION, JOB), "p50"),
                                       (_quantile(0.95, M.STEP_DURATION, JOB), "p95")], unit="s"),
        Panel("Step time by rank", [(mean_step_by_rank, "rank {{rank}}")], unit="s",
              description="Mean step time per rank: a rank above the others is a straggler."),
        Panel("Step time over the median, by rank (straggler above 1.5)",
              [(f"{_mean_rate(M.STEP_DURATION, JOB, 'rank, node')} / on() group_left() "
                f"quantile(0.5, {_mean_rate(M.STEP_DURATION, JOB, 'rank, node')})",
                "rank {{rank}} on {{node}}")],
              description="Each rank's mean step time over the job's median: a rank above 1.5 is a "
                          "straggler (a slow GPU, a busy node, a slow link); `trainctl status` and "
                          "`top` name it too."),
        Panel("Rank skew (slowest / fastest mean step)",
              [(f"max({mean_step_by_rank}) / min({mean_step_by_rank})", "skew")],
              description="1 when all ranks are equally fast; DDP waits for the slowest rank."),
        Panel("Steps behind the leading rank",
              [(f"max({M.RANK_STEP.name}{{{JOB}}}) - on() group_right() {M.RANK_STEP.name}{{{JOB}}}",
                "rank {{rank}}")]),
        Panel("Loss", [(f"{M.LOSS.name}{{{JOB}}}", "rank {{rank}}")]),
        Panel("Learning rate", [(f"max({M.LEARNING_RATE.name}{{{JOB}}})", "lr")]),
        Panel("Data stall (share of step time waiting on data)",
              [(f"{M.DATA_STALL.name}{{{JOB}}}", "rank {{rank}}")], unit="percentunit"),
        Panel("Data-loader wait per step (p95)",
              [(_quantile(0.95, M.DATA_WAIT, JOB, "rank"), "rank {{rank}}")], unit="s"),
        Panel("Collective time by op (share of wall time)",
              [(f"sum by (op) (rate({M.COLLECTIVE_DURATION.name}_sum{{{JOB}}}[{RATE}])) / "
                f"count by (op) ({M.COLLECTIVE_DURATION.name}_count{{{JOB}}})", "{{op}}")],
              unit="percentunit", description="Collectives called through ctx, averaged over ranks."),
        Panel("Collective duration (p95) by op",
              [(_quantile(0.95, M.COLLECTIVE_DURATION, JOB, "op"), "{{op}}")], unit="s"),
        Panel("Checkpoint save duration (mean)",
              [(f"max({M.CHECKPOINT_DURATION.name}_sum{{{JOB}}}) / max({M.CHECKPOINT_DURATION.name}_count{{{JOB}}})",
                "mean save")], unit="s"),
        Panel("Checkpoint size", [(f"max({M.CHECKPOINT_SIZE.name}{{{JOB}}})", "bytes")], unit="bytes"),
        Panel("Checkpoints saved", [(f"max({M.CHECKPOINTS.name}{{{JOB}}})", "checkpoints")]),
        Panel("Workers", [(f"max({M.JOB_WORKERS.name}{{{JOB}}})", "workers")]),
        Panel("Restarts by reason", [(f"sum by (reason) ({M.RESTARTS.name}{{{JOB}}})", "{{reason}}")]),
        Panel("Preemptions by reason", [(f"sum by (reason) ({M.PREEMPTIONS.name}{{{JOB}}})", "{{reason}}")]),
        Panel("Goodput over time", [(f"max({M.GOODPUT.name}{{{JOB}}})", "goodput")], unit="percentunit"),
        Panel("Productive vs wall time", [(f"max({M.PRODUCTIVE.name}{{{JOB}}})", "productive"),
                                          (f"max({M.WALL.name}{{{JOB}}})", "wall")], unit="s"),
        Panel("Seconds since each rank's last report",
              [(f"time() - {M.RANK_LAST_REPORT.name}{{{JOB}}}", "rank {{rank}}")], unit="s",
              description="Grows without bound for a hung rank."),
        Panel("GPU memory allocated", [(f"{M.GPU_ALLOCATED.name}{{{JOB}}}", "rank {{rank}}")],
              unit="bytes", gpu=True),
        Panel("GPU memory reserved", [(f"{M.GPU_RESERVED.name}{{{JOB}}}", "rank {{rank}}")],
              unit="bytes", gpu=True),
        Panel("GPU utilisation", [(f"{M.GPU_UTILIZATION.name}{{{JOB}}}", "rank {{rank}}")],
              unit="percentunit", gpu=True),
    ]


def _variables(with_job: bool) -> list[dict]:
    variables = [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                  "query": "prometheus", "current": {}, "hide": 0}]
    if with_job:
        query = f"label_values({M.JOB_STATE.name}, job)"
        variables.append({"name": "job", "label": "Job", "type": "query", "datasource": DATASOURCE,
                          "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                          "definition": query, "refresh": 2, "sort": 1, "current": {}, "hide": 0})
    return variables


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    height = 4 if panel.kind == "stat" else 8
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(panel.targets)],
    }
    if panel.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    else:
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    if panel.description:
        out["description"] = panel.description
    if panel.gpu:
        out["description"] = (panel.description + " " if panel.description else "") + \
            "Only ranks with a GPU report this."
    return out


def dashboard(uid: str, title: str, panels: list[Panel], with_job: bool) -> dict:
    laid_out, x, y, row_h = [], 0, 0, 0
    for pid, panel in enumerate(panels, start=1):
        height = 4 if panel.kind == "stat" else 8
        if x + panel.width > 24:
            x, y, row_h = 0, y + row_h, 0
        laid_out.append(_panel_json(panel, pid, x, y))
        x, row_h = x + panel.width, max(row_h, height)
    return {
        "uid": uid, "title": title, "tags": ["trainctl"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
        "templating": {"list": _variables(with_job)}, "annotations": {"list": []},
        "panels": laid_out,
    }


def dashboards() -> dict[str, dict]:
    return {
        "dashboard-cluster.json": dashboard("trainctl-cluster", "trainctl / cluster", cluster_panels(), False),
        "dashboard-job.json": dashboard("trainctl-job", "trainctl / job", job_panels(), True),
    }


def prometheus_config(target: str = f"127.0.0.1:{M.DEFAULT_PORT}", interval: str = "15s") -> str:
    return f"""\
# Generated by `python -m orchestrator.monitoring.dashboards`; do not edit by hand.
# Scrapes the trainctl controller's /metrics on the Ray head (default 127.0.0.1:{M.DEFAULT_PORT};
# `trainctl cluster status` prints the endpoint; set TRAINCTL_METRICS_HOST=0.0.0.0 where the
# controller starts to scrape it from another machine, then put that host here).
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: trainctl
    metrics_path: /metrics
    # trainctl's series carry their own `job` label (the training job's id): keep it, rather
    # than renaming it to exported_job in favour of this scrape job's name
    honor_labels: true
    static_configs:
      - targets: ["{target}"]
  # Ray's own metrics: the head writes the targets of every node to this file.
  - job_name: ray
    file_sd_configs:
      - files: ["/tmp/ray/prom_metrics_service_discovery.json"]
"""


def generated_files() -> dict[str, str]:
    files = {name: json.dumps(board, indent=2) + "\n" for name, board in dashboards().items()}
    files["prometheus.yml"] = prometheus_config()
    return files


def all_panels() -> list[tuple[str, Panel]]:
    return [("cluster", p) for p in cluster_panels()] + [("job", p) for p in job_panels()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, text in generated_files().items():
        path = MONITORING_DIR / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m orchestrator.monitoring.dashboards")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
