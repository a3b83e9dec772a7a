"""`trainctl queue create|set|list|delete`: queues with CPU/GPU quotas and fair-share weights."""

from __future__ import annotations

import json

import click

from ..control import queues as rules

address_option = click.option("--address", default=None,
                              help="Ray cluster address (else RAY_ADDRESS, else `trainctl cluster up`)")
cpus_option = click.option("--cpus", default=None, metavar="N",
                           help="nominal CPU quota (a number, or 'none': no quota)")
gpus_option = click.option("--gpus", default=None, metavar="N",
                           help="nominal GPU quota (a number, or 'none': no quota)")
weight_option = click.option("--weight", type=float, default=None, metavar="W",
                             help="fair-share weight between queues (default 1)")
borrow_option = click.option("--borrow/--no-borrow", default=None,
                             help="may use capacity beyond its quota that other queues leave idle (default: may)")


def _controller(address):
    from .api import Client

    return Client(address)


@click.group()
def queue():
    """Queues with quotas and fair share: jobs name one with `queue:` in the spec (default: default)."""


@queue.command()
@click.argument("name")
@cpus_option
@gpus_option
@weight_option
@borrow_option
@address_option
def create(name, cpus, gpus, weight, borrow, address):
    """Create queue NAME."""
    rules.check_name(name)  # every value checked before the cluster is contacted: nothing half-made
    cpus, gpus = rules.parse_amount(cpus, "--cpus"), rules.parse_amount(gpus, "--gpus")
    weight = rules.check_weight(1.0 if weight is None else weight)
    created = _controller(address)._call("create_queue", name, cpus, gpus, weight, True if borrow is None else borrow)
    click.echo(f"created queue {name}: {_settings(created)}")


@queue.command(name="set")
@click.argument("name")
@cpus_option
@gpus_option
@weight_option
@borrow_option
@address_option
def set_(name, cpus, gpus, weight, borrow, address):
    """Change queue NAME (only the options given)."""
    rules.check_name(name)
    changes = {}
    if cpus is not None:
        changes["cpus"] = rules.parse_amount(cpus, "--cpus")
    if gpus is not None:
        changes["gpus"] = rules.parse_amount(gpus, "--gpus")
    if weight is not None:
        changes["weight"] = rules.check_weight(weight)
    if borrow is not None:
        changes["borrow"] = borrow
    if not changes:
        raise click.UsageError("nothing to change: give --cpus, --gpus, --weight or --borrow/--no-borrow")
    changed = _controller(address)._call("set_queue", name, changes)
    click.echo(f"queue {name}: {_settings(changed)}")


@queue.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@address_option
def list_(as_json, address):
    """Every queue: quota, weight, borrowing, what it holds now, its jobs."""
    rows = _controller(address)._call("list_queues")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("QUEUE", "CPUS", "GPUS", "WEIGHT", "BORROW", "RUNNING", "QUEUED"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], _used(row["used_cpus"], row["cpus"]), _used(row["used_gpus"], row["gpus"]),
                      f"{row['weight']:g}", "yes" if row["borrow"] else "no", str(row["running"]), str(row["queued"]))
    Console().print(table)


@queue.command()
@click.argument("name")
@address_option
def delete(name, address):
    """Delete queue NAME (refused while jobs wait or run in it)."""
    rules.check_name(name)
    _controller(address)._call("delete_queue", name)
    click.echo(f"deleted queue {name}")


def _used(used: float, quota: float | None) -> str:
    return f"{used:g}/{'-' if quota is None else f'{quota:g}'}"


def _settings(q: dict) -> str:
    def amount(v):
        return "no quota" if v is None else f"{v:g}"
    return (f"cpus {amount(q['cpus'])}, gpus {amount(q['gpus'])}, weight {q['weight']:g}, "
            f"{'may' if q['borrow'] else 'may not'} borrow")
