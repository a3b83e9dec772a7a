"""`trainctl run`'s live view: a progress bar per job, optional rank logs, a final summary."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..control.states import JobState
from .render import duration, fmt_number, metrics_line


def print_log_lines(text: str, rank: int | None) -> None:
    for line in text.splitlines():
        if rank is None or line.startswith(f"[rank {rank}] "):
            sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fields(job: dict) -> dict:
    p = job.get("progress") or {}
    loss = (job.get("metrics") or {}).get("loss")
    return {
        "state": job["state"],
        "loss": f"loss {fmt_number(loss)}" if loss is not None else "",
        "rate": f"{p.get('samples_per_s', 0):.0f} samples/s" if p.get("samples_per_s") else "",
        "eta": f"ETA {duration(p.get('eta_s'))}" if p.get("eta_s") is not None else "",
    }


def follow(client, job_id: str, console: Console, stream_logs: bool = False, poll_s: float = 0.5) -> dict:
    started = time.monotonic()
    offset = 0
    live = console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), TextColumn("{task.fields[state]}"), BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total}"), TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
        console=console, disable=not live, transient=False,
    )
    last_state, last_line = None, 0.0
    with progress:
        task = progress.add_task(job_id, total=None, state="", loss="", rate="", eta="")
        while True:
            job = client.get(job_id)
            p = job.get("progress") or {}
            progress.update(task, completed=p.get("step") or 0, total=p.get("total_steps"), **_fields(job))
            if stream_logs:
                text, offset = client.read_logs(job_id, offset)
                if text:
                    progress.console.print(text.rstrip("\n"), markup=False, highlight=False)
            if not live and (job["state"] != last_state or time.monotonic() - last_line > 10):
                f = _fields(job)
                console.print(f"{job_id} {job['state']} step {p.get('step', 0)}/{p.get('total_steps') or '?'} "
                              f"{f['loss']} {f['rate']} {f['eta']}".rstrip(), markup=False, highlight=False, soft_wrap=True)
                last_state, last_line = job["state"], time.monotonic()
            if JobState(job["state"]).terminal:
                break
            time.sleep(poll_s)
    if stream_logs:
        text, offset = client.read_logs(job_id, offset)
        if text:
            console.print(text.rstrip("\n"), markup=False, highlight=False)
    took = time.monotonic() - started
    summary = f"{job_id} {job['state']} in {took:.1f}s"
    if job.get("metrics"):
        summary += f"  {metrics_line(job['metrics'])}"
    if job.get("post_training"):
        pt, final = job["post_training"], job["post_training"]["final"]
        console.print(f"post-training: kept {', '.join(pt['kept']) or 'no pass'}; size {final['size_ratio']:.2f}x, "
                      f"speedup {final['speedup']:.2f}x at batch 1 (measured); report {pt['report']}",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    if job.get("error"):
        console.print(f"error: {job['error']}", markup=False, highlight=False, soft_wrap=True)
    return job
