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
    for col in ("ID", "NAME", "STATE", "QUEUE", "STRATEGY", "WORKERS", "PROGRESS", "AGE"):
        table.add_column(col)
    now = time.time()
    for job in jobs:  # summaries (Client.list)
        table.add_row(job["id"], job["name"], state_text(job), job.get("queue", "default"), job["strategy"],
                      str(job["workers"]),
                      progress_text(job), duration(now - job["submitted_at"]))
    return table


def state_text(job: dict) -> str:
    """The state, and for a job waiting or releasing after a preemption, why: `QUEUED (preempted by j-2)`."""
    if job.get("last_preemption") and job["state"] in ("QUEUED", "PREEMPTING"):
        return f"{job['state']} ({job['last_preemption']})"
    return job["state"]


def preemption_lines(job: dict) -> list[str]:
    """`status`: each just-in-time checkpoint after which the job gave its gang back."""
    records = job.get("preemptions") or []
    if not records:
        return []
    t0, lines = job["submitted_at"], [f"  preempted  {len(records)} times (no restart spent)"]
    for p in records:
        saved = (f"saved step {p['step']} just in time" if p.get("saved") else
                 f"no checkpoint within the grace period: resumes from step {p['step']}" if p.get("step") is not None
                 else "no checkpoint yet: starts over")
        took = f", {p['seconds']:.1f}s" if p.get("seconds") is not None else ""
        lines.append(f"    +{p['at'] - t0:7.1f}s  {p['reason']}  ({saved}{took})")
    return lines


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
    if job.get("health") and job["state"] not in ("PENDING", "QUEUED"):
        console.print(f"  health     {health_line(job)}", highlight=False)
    if job.get("metrics"):
        console.print(f"  metrics    {metrics_line(job['metrics'])}")
    if job.get("checkpoint"):
        c = job["checkpoint"]
        console.print(f"  checkpoint {c['path']} (step {c['step']}, {c['bytes']} bytes)")
    for line in tracking_lines(job):
        console.print(line, highlight=False)
    if job.get("post_training"):
        pt = job["post_training"]
        console.print(f"  report     {pt['report']}  (model {pt['model']}; kept: {', '.join(pt['kept']) or 'none'})")
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
    for line in preemption_lines(job):
        console.print(line, highlight=False)
    console.print(f"  logs       trainctl logs {job['id']}")


def tracking_lines(job: dict) -> list[str]:
    """The best checkpoint (checkpoint.keep_best) and where the job's curves are."""
    spec, lines = job["spec"], []
    best = job.get("best_checkpoint")
    if best:
        lines.append(f"  best       {best['path']} ({best['metric']} {fmt_number(best['value'])} at step {best['step']})")
    tracking = spec.get("tracking") or {}
    if tracking.get("tensorboard") and job.get("checkpoint_root"):
        # imported here: it brings pydantic, which `list` and `status` never need otherwise
        from ..control.tracking import tensorboard_dir

        lines.append(f"  curves     tensorboard --logdir {tensorboard_dir(job['checkpoint_root'])}")
    if tracking.get("mlflow"):
        m = tracking["mlflow"]
        lines.append(f"  mlflow     {m['uri']}  experiment {m['experiment']}, run {job['id']}")
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def health_line(job: dict) -> str:
    """Throughput, step time, data stall, restarts, goodput: what /metrics also exports."""
    h = job.get("health") or {}
    parts = [f"{h.get('samples_per_s') or 0:.1f} samples/s", f"{h.get('steps_per_s') or 0:.2f} steps/s"]
    if h.get("step_s"):
        parts.append(f"step {1000 * h['step_s']:.1f} ms")
    parts += [f"data stall {_pct(h.get('data_stall_ratio'))}", f"restarts {h.get('restarts', 0)}",
              f"goodput {_pct(h.get('goodput_ratio'))}"]
    if h.get("rank_skew"):
        parts.append(f"rank skew {h['rank_skew']:.2f}x")
    if h.get("straggler"):
        parts.append(f"straggler: {straggler_text(h['straggler'])}")
    return "   ".join(parts)


def straggler_text(s: dict) -> str:
    return f"rank {s['rank']} on {s.get('node') or '?'} ({s['ratio']:.1f}x the median step)"


def top_table(jobs: list[dict]) -> Table:
    """`trainctl top`: every job with its health signals."""
    table = Table(box=None, pad_edge=False, title=f"trainctl top  {time.strftime('%H:%M:%S')}",
                  title_justify="left")
    for col in ("ID", "STATE", "STRATEGY", "WORKERS", "STEP", "SAMPLES/S", "STEP TIME", "DATA STALL",
                "RESTARTS", "GOODPUT", "SKEW", "STRAGGLER", "AGE"):
        table.add_column(col)
    now = time.time()
    for job in jobs:
        h = job.get("health") or {}
        table.add_row(
            job["id"], job["state"], job["strategy"], str(job["workers"]),
            progress_text(job), f"{h.get('samples_per_s') or 0:.1f}",
            f"{1000 * h['step_s']:.1f} ms" if h.get("step_s") else "-", _pct(h.get("data_stall_ratio")),
            str(h.get("restarts", job["restarts"])), _pct(h.get("goodput_ratio")),
            f"{h['rank_skew']:.2f}x" if h.get("rank_skew") else "-",
            straggler_text(h["straggler"]) if h.get("straggler") else "-", duration(now - job["submitted_at"]))
    return table


def live_view(console: Console, fetch, render, interval_s: float = 1.0, until_done: bool = False) -> None:
    """Re-render `render(console, fetch())` in place (rich Live) until Ctrl-C, or the job ends."""
    import io

    from rich.live import Live
    from rich.text import Text

    def frame():
        data = fetch()
        buffer = Console(file=io.StringIO(), force_terminal=console.is_terminal, width=console.width,
                         color_system=console.color_system)
        render(buffer, data)
        return data, Text.from_ansi(buffer.file.getvalue())

    data, text = frame()
    try:
        with Live(text, console=console, refresh_per_second=4, transient=False) as live:
            while not (until_done and data.get("state") in ("SUCCEEDED", "FAILED", "CANCELLED", "STOPPED")):
                time.sleep(interval_s)
                data, text = frame()
                live.update(text)
    except KeyboardInterrupt:
        pass
