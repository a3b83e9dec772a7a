"""How jobs look in the terminal: tables, detail views, the live progress line."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

HIDDEN_METRICS = {"samples"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def progress_text(job: dict) -> str:
    p = job.get("progress") or {}
    if not p.get("step"):
        return "-"
    total = p.get("total_steps")
    return f"{p['step']}/{total}" if total else str(p["step"])


def jobs_table(jobs: list[dict]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "NAME", "STATE", "STRATEGY", "WORKERS", "PROGRESS", "AGE"):
        table.add_column(col)
    now = time.time()
    for job in jobs:
        spec = job["spec"]
        table.add_row(job["id"], job["name"], job["state"], spec["strategy"]["name"],
                      str(spec["resources"]["workers"]), progress_text(job),
                      duration(now - job["submitted_at"]))
    return table


def metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k}={fmt_number(v)}" for k, v in metrics.items() if k not in HIDDEN_METRICS)


def print_status(console: Console, job: dict) -> None:
    spec = job["spec"]
    r = spec["resources"]
    console.print(f"[bold]{job['id']}[/bold]  {job['name']}  [bold]{job['state']}[/bold]")
    console.print(f"  strategy   {spec['strategy']['name']}   workers {r['workers']} x "
                  f"{r['cpus_per_worker']:g} CPU" + (f" + {r['gpus_per_worker']:g} GPU" if r["gpus_per_worker"] else "")
                  + f"   placement {r['placement']}   priority {job['priority']}")
    if job.get("queue_reason") and job["state"] == "QUEUED":
        console.print(f"  queued     {job['queue_reason']}")
    p = job.get("progress") or {}
    if p.get("step"):
        console.print(f"  progress   step {progress_text(job)}   {p.get('samples_per_s', 0):.1f} samples/s"
                      f"   ETA {duration(p.get('eta_s'))}")
    if job.get("metrics"):
        console.print(f"  metrics    {metrics_line(job['metrics'])}")
    if job.get("checkpoint"):
        c = job["checkpoint"]
        console.print(f"  checkpoint {c['path']} (step {c['step']}, {c['bytes']} bytes)")
    if job.get("error"):
        console.print(f"  [red]error[/red]      {job['error']}")
    console.print("  history")
    t0 = job["submitted_at"]
    for h in job["history"]:
        note = f"  {h['note']}" if h.get("note") else ""
        console.print(f"    +{h['at'] - t0:7.1f}s  {h['state']}{note}")
    if job.get("placement"):
        console.print("  placement")
        for p in job["placement"]:
            console.print(f"    rank {p['rank']}  node {p['node_rank']} ({p['node_ip']}, {p['node_id'][:12]})"
                          f"  local_rank {p['local_rank']}  pid {p['pid']}")
    if job.get("restarts"):
        console.print(f"  restarts   {len(job['restarts'])}")
        for rs in job["restarts"]:
            frm = rs.get("from_checkpoint")
            console.print(f"    +{rs['at'] - t0:7.1f}s  {rs['cause']}"
                          + (f"  (resumed from checkpoint {frm})" if frm is not None else ""))
    console.print(f"  logs       trainctl logs {job['id']}")
