"""`trainctl sweep SWEEP.yaml` and `trainctl sweep status|list|cancel` (registered on the main CLI)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..client.cli import address_option, set_option
from .record import SweepState

console = Console()


class _SweepGroup(click.Group):
    """`trainctl sweep SWEEP.yaml` is `trainctl sweep submit SWEEP.yaml`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["submit", *args]
        return super().parse_args(ctx, args)


@click.group(name="sweep", cls=_SweepGroup, invoke_without_command=False)
def sweep() -> None:
    """Hyperparameter sweeps: `trainctl sweep SWEEP.yaml` starts one; its trials are queued jobs."""


@sweep.command()
@click.argument("sweep_file", type=click.Path())
@address_option
@set_option
@click.option("--wait", is_flag=True, help="follow the sweep until it ends, then print its status")
def submit(sweep_file, address, overrides, wait):
    """Start the sweep in SWEEP_FILE and print its id (the same as `trainctl sweep SWEEP_FILE`)."""
    from ..client.api import Client
    from .api import checked, submit_sweep, wait_sweep

    spec, base = checked(sweep_file, list(overrides))  # bad input fails before any connection
    client = Client(address)
    record = submit_sweep(client, spec, base)
    click.echo(record["id"])
    if wait:
        status = wait_sweep(client, record["id"])
        print_status(status, None)


@sweep.command()
@click.argument("sweep_id", metavar="SWEEP")
@address_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--chart", "chart_path", type=click.Path(), default=None,
              help="where to write the PNG (default: <checkpoint storage>/<sweep id>/sweep.png)")
@click.option("--no-chart", is_flag=True, help="do not write the PNG")
def status(sweep_id, address, as_json, chart_path, no_chart):
    """The trials (parameters, state, best metric, steps), the best trial and its checkpoint (and
    with the sweep's post_training, its post-training job and report), and a PNG of the
    optimisation history and parallel coordinates. SWEEP: an id, or a name (the newest)."""
    from ..client.api import Client

    doc = Client(address)._call("sweep_status", sweep_id)
    chart = None
    if not no_chart:
        from .chart import write_chart

        storage = doc["base"]["checkpoint"]["storage"]
        target = chart_path or (Path(f"{doc['id']}.png") if "://" in storage else
                                Path(storage) / doc["id"] / "sweep.png")
        try:
            chart = write_chart(doc, target)
        except OSError as exc:
            click.echo(f"chart not written: {exc}", err=True)
    if as_json:
        doc["chart"] = str(chart) if chart else None
        click.echo(json.dumps(doc, indent=2))
    else:
        print_status(doc, chart)


@sweep.command(name="list")
@address_option
@click.option("--json", "as_json", is_flag=True)
def list_sweeps(address, as_json):
    """Every sweep: id, state, trials by state, best value."""
    from ..client.api import Client

    sweeps = Client(address)._call("list_sweeps")
    if as_json:
        click.echo(json.dumps(sweeps, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("SWEEP", "STATE", "SEARCH", "TRIALS", "BEST", "AGE"):
        table.add_column(col)
    for s in sweeps:
        states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s["states"].items()))
        best = f"{s['objective']['metric']} {s['best_value']:.4g}" if s["best_value"] is not None else "-"
        table.add_row(s["id"], s["state"], s["search"] or "", f"{s['trials']} ({states})" if states else "0",
                      best, _age(s["created_at"]))
    console.print(table)


@sweep.command()
@click.argument("sweep_id", metavar="SWEEP")
@address_option
def cancel(sweep_id, address):
    """Cancel the sweep: its unfinished trials are cancelled, nothing new is started."""
    from ..client.api import Client

    record = Client(address)._call("cancel_sweep", sweep_id)
    click.echo(f"{record['id']} {record['state']}")


def _age(at: float) -> str:
    seconds = max(0, int(time.time() - at))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _value(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def print_status(doc: dict, chart: Path | None) -> None:
    objective = doc["spec"]["objective"]
    params = list(doc["spec"]["parameters"])
    console.print(f"sweep {doc['id']}: {doc['state']}{' (' + doc['note'] + ')' if doc.get('note') else ''}; "
                  f"{doc['spec']['search']} search, objective {objective['metric']} ({objective['mode']})",
                  markup=False, highlight=False)
    table = Table(box=None, pad_edge=False)
    for col in ("TRIAL", "STATE", *params, f"BEST {objective['metric'].upper()}", "FINAL", "STEPS"):
        table.add_column(col)
    for t in doc["trials"]:
        steps = f"{t['steps']}/{t['total_steps']}" if t.get("total_steps") else str(t["steps"])
        table.add_row(t["name"], t["state"], *(_value(t["params"].get(p)) for p in params),
                      _value(t.get("best")), _value(t.get("value")), steps)
    console.print(table)
    best = next((t for t in doc["trials"] if t["number"] == doc.get("best")), None)
    if best is not None:
        console.print(f"best: {best['name']} ({best['job_id']}) {objective['metric']} {_value(best['value'])}, "
                      f"checkpoint {best.get('checkpoint') or '-'}", markup=False, highlight=False, soft_wrap=True)
        post = doc.get("post_training")
        if post is not None:  # the sweep's post_training (sweep/post.py)
            print_post_training(post)
        elif best.get("checkpoint") and not doc["spec"].get("post_training"):
            console.print(f"post-training: trainctl compress {best['checkpoint']} --passes PASSES.yaml "
                          "--job <the base job file>", markup=False, highlight=False, soft_wrap=True)
    if chart is not None:
        console.print(f"chart: {chart}", markup=False, highlight=False, soft_wrap=True)
    if SweepState(doc["state"]) is SweepState.RUNNING:
        console.print(f"unfinished trials: {sum(not t['done'] for t in doc['trials'])}", highlight=False)


def print_post_training(post: dict) -> None:
    """The post-training job's line, and once it ran, what the passes kept and the report."""
    console.print(f"post-training: job {post['job_id'] or '(not created yet)'} {post['state']}, "
                  f"on {post['checkpoint']}", markup=False, highlight=False, soft_wrap=True)
    report = post.get("report")
    if report:
        final = report.get("final") or {}
        sized = f", {final['size_ratio']:.2f}x the size" if isinstance(final.get("size_ratio"), float) else ""
        console.print(f"  kept: {', '.join(report.get('kept') or []) or 'no pass'}; model {report.get('model')}"
                      f"{sized}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"  report: {report.get('report')}", markup=False, highlight=False, soft_wrap=True)
    elif post.get("error"):
        console.print(f"  error: {post['error']}", markup=False, highlight=False, soft_wrap=True)
