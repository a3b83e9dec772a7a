"""The `trainctl` command line."""

from __future__ import annotations

import json
import re
import signal
import sys
import time

import click
from rich.console import Console

from ..control.states import JobState
from ..errors import UserError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2, never a traceback; loads
    the LAZY groups' modules only when one of them runs (`trainctl list` and `--help` stay
    clear of pyarrow and pydantic, which `trainctl data` and `sweep` need)."""

    LAZY = {  # name: (module, attribute, its help as --help lists it)
        "data": ("orchestrator.data.cli", "data", "Write and describe sharded Arrow datasets."),
        "sweep": ("orchestrator.sweep.cli", "sweep",
                  "Hyperparameter sweeps: `trainctl sweep SWEEP.yaml` starts one; its trials are queued jobs."),
        "queue": ("orchestrator.client.queue_cli", "queue",
                  "Queues with quotas and fair share: jobs name one with `queue:` in the spec (default: default)."),
    }

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self.LAZY:  # for --help's list: its one line, nothing loaded
            command = click.Group(name, help=self.LAZY[name][2])
        return command

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr, _ = self.LAZY[name]
            command = getattr(importlib.import_module(module), attr)
            self.add_command(command, name)
        return name, command, rest

    def invoke(self, ctx):
        from cluster.connect import NoClusterError

        try:
            return super().invoke(ctx)
        except (UserError, NoClusterError) as exc:
            _fail(str(exc))
        except click.exceptions.NoArgsIsHelpError:
            raise  # `trainctl data` alone: its help, as click prints it
        except click.UsageError as exc:  # a missing argument, an unknown option or command, a bad --flag value
            _fail(_usage_line(exc))


def _fail(line: str) -> None:
    line = " ".join(line.splitlines())  # one line, even from an exception text that has several
    err_console.print(f"trainctl: error: {line}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


def _usage_line(exc: click.UsageError) -> str:
    """click's usage error as one line: "logs: Missing argument 'JOB_ID'; see 'trainctl logs --help'"."""
    names, ctx = [], exc.ctx
    while ctx is not None and ctx.parent is not None:  # the root is `python -m orchestrator` or `trainctl`
        names.append(ctx.info_name)
        ctx = ctx.parent
    command = " ".join(reversed(names))
    message = " ".join(exc.format_message().split())
    message = re.sub(r"\.? Did you mean (.*)\?$", r" (did you mean \1?)", message).removesuffix(".")
    return f"{command + ': ' if command else ''}{message}; see 'trainctl {command + ' ' if command else ''}--help'"


address_option = click.option("--address", default=None, help="Ray cluster address (else RAY_ADDRESS, else `trainctl cluster up`)")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="override a spec field, e.g. --set resources.workers=4")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """trainctl: distributed PyTorch training on Ray."""


def _prepare(job_file: str | None, overrides, command: list[str] | None = None, flags=None) -> object:
    """The resolved spec from JOB_FILE, a command after `--` (which replaces the file's), or both."""
    from ..errors import SpecError
    from ..spec import parse_spec, read_yaml
    from .api import as_spec, resolve
    from .command_job import ResourceFlags, command_job

    flags = flags or ResourceFlags()
    if job_file is not None and not command and flags == ResourceFlags():
        return resolve(as_spec(job_file, list(overrides)))
    if job_file is None and not command:
        name = click.get_current_context().info_name
        raise click.UsageError(f"Missing argument 'JOB_FILE' (or a command after --, e.g. trainctl {name} "
                               "--workers 2 -- python train.py)", click.get_current_context())
    doc = read_yaml(job_file) if job_file is not None else {}
    if not isinstance(doc, dict):
        raise SpecError(f"{job_file}: a job spec must be a mapping of fields (name, entrypoint, ...)")
    source = job_file if job_file is not None else "command line"
    return resolve(parse_spec(command_job(doc, command, flags), source, list(overrides)))


class _CommandAfterDashes(click.Command):
    """Everything after `--` is the job's command (a torchrun-style script), never trainctl's options."""

    def parse_args(self, ctx, args):
        if "--" in args:
            at = args.index("--")
            ctx.meta["trainctl.command"] = args[at + 1:]
            args = args[:at]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx):
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND...]"]


def _resource_options(fn):
    """run's and submit's flags for a job without YAML (they override the YAML's resources too)."""
    options = [
        click.option("--name", default=None, help="job name (default: the spec's, else the script's stem)"),
        click.option("--workers", type=click.IntRange(min=1), default=None, help="ranks (resources.workers)"),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None),
        click.option("--placement", type=click.Choice(["pack", "spread", "strict_spread", "strict_pack"]), default=None),
        click.option("--nnodes", type=click.IntRange(min=1), default=None,
                     help="as torchrun's: workers = nnodes x nproc-per-node, spread over nodes"),
        click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
                     help="as torchrun's: ranks kept together on one node (resources.colocate)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _flags(name, workers, cpus_per_worker, gpus_per_worker, placement, nnodes, nproc_per_node):
    from .command_job import ResourceFlags

    return ResourceFlags(workers, cpus_per_worker, gpus_per_worker, placement, nnodes, nproc_per_node, name)


@main.command(cls=_CommandAfterDashes)
@click.argument("job_file", type=click.Path(), required=False)
@address_option
@set_option
@_resource_options
@click.option("--logs", "stream_logs", is_flag=True, help="stream every rank's log lines")
@click.pass_context
def run(ctx, job_file, address, overrides, name, workers, cpus_per_worker, gpus_per_worker, placement, nnodes,
        nproc_per_node, stream_logs):
    """Submit JOB_FILE (or the command after --) and follow it to the end (Ctrl-C cancels the job).

    \b
    trainctl run job.yaml
    trainctl run --workers 4 -- python train.py --lr 0.1
    trainctl run -- torchrun --nnodes 2 --nproc-per-node 2 train.py
    """
    from .api import Client
    from .follow import follow

    spec = _prepare(job_file, overrides, ctx.meta.get("trainctl.command"),
                    _flags(name, workers, cpus_per_worker, gpus_per_worker, placement, nnodes, nproc_per_node))
    client = Client(address, embedded=True)
    job_id = client.submit(spec)
    console.print(f"submitted {job_id}" + (" to an embedded Ray" if client.mode == "embedded" else ""))
    try:
        job = follow(client, job_id, console, stream_logs=stream_logs)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cancel
        client.cancel(job_id)
        err_console.print(f"cancelled {job_id}")
        sys.exit(130)
    sys.exit(0 if job["state"] == "SUCCEEDED" else 1)


@main.command(cls=_CommandAfterDashes)
@click.argument("job_file", type=click.Path(), required=False)
@address_option
@set_option
@_resource_options
@click.option("--priority", type=int, default=None, help="overrides the spec's priority")
@click.pass_context
def submit(ctx, job_file, address, overrides, name, workers, cpus_per_worker, gpus_per_worker, placement, nnodes,
           nproc_per_node, priority):
    """Queue JOB_FILE (or the command after --) and print its id."""
    from .api import Client

    spec = _prepare(job_file, overrides, ctx.meta.get("trainctl.command"),
                    _flags(name, workers, cpus_per_worker, gpus_per_worker, placement, nnodes, nproc_per_node))
    client = Client(address)
    click.echo(client.submit(spec, priority=priority))


@main.command(name="list")
@address_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--state", "states", multiple=True, metavar="STATE",
              type=click.Choice([s.value for s in JobState], case_sensitive=False),
              help="only jobs in this state (repeat for several)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the newest N jobs")
@click.option("--all", "show_all", is_flag=True, help="also jobs that ended more than a day ago")
def list_jobs(address, as_json, states, limit, show_all):
    """Unfinished jobs and those that ended in the last day: id, name, state, strategy, workers,
    progress, age (--all: every job)."""
    from ..control.http_api import RECENT_S
    from .http import ReadClient
    from .render import jobs_table

    ended_since = None if (show_all or states) else time.time() - RECENT_S
    jobs = ReadClient(address).list([s.upper() for s in states] or None, ended_since, limit)
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
    else:
        console.print(jobs_table(jobs))


@main.command()
@click.argument("job_id")
@address_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", "-w", is_flag=True, help="refresh live until the job ends (Ctrl-C stops watching)")
def status(job_id, address, as_json, watch):
    """One job in detail."""
    from .http import ReadClient
    from .render import print_status

    client = ReadClient(address)
    job = client.get(job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2))
    elif watch:
        from .render import live_view

        live_view(console, lambda: client.get(job_id), print_status, until_done=True)
    else:
        print_status(console, job)


@main.command()
@address_option
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print the table once and exit")
@click.option("--all", "show_all", is_flag=True, help="also jobs that ended")
def top(address, interval, once, show_all):
    """Every job's health, refreshed live: throughput, step time, data stall, restarts, goodput."""
    from .http import ReadClient
    from .render import live_view, top_table

    client = ReadClient(address)

    unfinished = [s.value for s in JobState if not s.terminal]

    def jobs():
        return client.list(None if show_all else unfinished)

    if once:  # into a pipe: wide enough for every column, not the 80 of a non-terminal
        (console if console.is_terminal else Console(width=200)).print(top_table(jobs()))
        return
    live_view(console, jobs, lambda c, js: c.print(top_table(js)), interval_s=interval)


@main.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@click.option("--rank", type=int, default=None, help="only this rank's lines")
def logs(job_id, address, follow, rank):
    """Every rank's output, prefixed [rank N], from every node."""
    from .follow import print_log_lines
    from .http import ReadClient

    client = ReadClient(address)
    offset = 0
    while True:
        text, offset = client.read_logs(job_id, offset, rank)
        print_log_lines(text, rank)
        if not follow:
            return
        if not text:
            if JobState(client.get(job_id)["state"]).terminal:
                text, offset = client.read_logs(job_id, offset, rank)
                print_log_lines(text, rank)
                return
            time.sleep(0.5)


@main.command()
@click.argument("job_id")
@address_option
def cancel(job_id, address):
    """Stop a queued or running job and free its resources."""
    from .http import ReadClient

    job = ReadClient(address).cancel(job_id)
    click.echo(f"{job['id']} {job['state']}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--passes", "passes_file", required=True, type=click.Path(), metavar="PASSES.yaml",
              help="a post_training mapping (passes, gate, eval), or a whole job spec that has one")
@click.option("--job", "job_file", default=None, type=click.Path(), metavar="JOB.yaml",
              help="the job spec the checkpoint came from (entrypoint, config, data) when PASSES.yaml is not one")
@click.option("--out", default=None, help="report and model directory (default: next to the checkpoint, post_training/)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads while measuring (default: torch's)")
@set_option
def compress(checkpoint, passes_file, job_file, out, threads, overrides):
    """Run post-training passes (pruning, quantization) on an existing CHECKPOINT, here."""
    from ..compress.cli import compress_checkpoint

    try:
        summary = compress_checkpoint(checkpoint, passes_file, job_file, out, threads, list(overrides),
                                      log=lambda line: click.echo(line))
    except UserError:
        raise
    except Exception as exc:  # a pass that failed on this model: one line, exit 1
        err_console.print(f"trainctl: compress failed: {type(exc).__name__}: {exc}", markup=False,
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    final = summary["final"]
    click.echo(f"kept {', '.join(summary['kept']) or 'no pass'}: {final['path']} "
               f"(size {final['size_ratio']:.2f}x, speedup {final['speedup']:.2f}x at batch 1, measured)")


@main.command()
def schema():
    """Print the JSON Schema of the job spec."""
    from ..spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.group()
def cluster():
    """A local Ray head for single-machine use."""


@cluster.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="GCS port (default: a free one)")
@click.option("--num-cpus", type=click.IntRange(min=0), default=None)
@click.option("--num-gpus", type=click.IntRange(min=0), default=None)
@click.option("--state", default=None, metavar="DIR|URL",
              help="the job store: a directory (SQLite) or a postgresql:// URL "
                   "(default: TRAINCTL_STATE, else ~/.trainctl/state); it survives `cluster down`")
def up(port, num_cpus, num_gpus, state):
    """Start a local Ray head on 127.0.0.1 that later commands use."""
    from cluster.connect import HeadStartError
    from cluster.connect import up as start

    try:  # recorded only once the head and its controller answer
        info = start(port=port, num_cpus=num_cpus, num_gpus=num_gpus, state=state,
                     probe=[sys.executable, "-m", "orchestrator.client.head_check"])
    except HeadStartError as exc:  # not the user's input: exit 1, still one line
        err_console.print(f"trainctl: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    verb = "already running" if info.get("already_running") else "started"
    click.echo(f"Ray head {verb} at {info['address']} (pid {info['pid']}), jobs stored in {info.get('state')}")


@cluster.command()
def down():
    """Stop the local head started by `cluster up`."""
    from cluster.connect import down as stop

    info = stop()
    click.echo(f"stopped the Ray head at {info['address']}" if info else "no local cluster is running")


@cluster.command(name="status")
@address_option
@click.option("--json", "as_json", is_flag=True)
def cluster_status(address, as_json):
    """Nodes with CPUs and GPUs, total and free."""
    from dataclasses import asdict

    from rich.table import Table

    from cluster import inventory
    from cluster.connect import connect

    from ..control.controller import metrics_endpoint

    where = connect(address)
    nodes = inventory.nodes()
    endpoint = metrics_endpoint()
    if as_json:
        click.echo(json.dumps({"address": where, "nodes": [asdict(n) for n in nodes], "metrics": endpoint},
                              indent=2))
        return
    table = Table(box=None, pad_edge=False, title=f"Ray cluster at {where}", title_justify="left")
    for col in ("NODE", "ADDRESS", "HEAD", "CPUS", "FREE CPUS", "GPUS", "FREE GPUS"):
        table.add_column(col)
    for n in nodes:
        table.add_row(n.node_id[:12], n.address, "yes" if n.is_head else "", f"{n.cpus:g}",
                      f"{n.free_cpus:g}", f"{n.gpus:g}", f"{n.free_gpus:g}")
    console.print(table)
    total = sum(n.cpus for n in nodes), sum(n.free_cpus for n in nodes)
    console.print(f"{len(nodes)} nodes, {total[1]:g}/{total[0]:g} CPUs free, "
                  f"{sum(n.free_gpus for n in nodes):g}/{sum(n.gpus for n in nodes):g} GPUs free")
    console.print(f"metrics at {endpoint} (Prometheus scrape target; dashboards in cluster/monitoring/)"
                  if endpoint else "metrics off (TRAINCTL_METRICS=0 when the controller started)",
                  markup=False, highlight=False, soft_wrap=True)



@cluster.command(name="drain")
@click.argument("node")
@address_option
def cluster_drain(node, address):
    """Move every job off NODE (a node id or IP) before it goes: they checkpoint just in time and
    move elsewhere or shrink; nothing new is placed there."""
    from .api import Client

    done = Client(address).drain(node)
    moved = ", ".join(done["jobs"]) or "no running job"
    ray_note = "" if done["ray_draining"] else f" (Ray did not mark it draining: {done['ray_reason']})"
    click.echo(f"draining node {done['address']} ({done['node_id'][:12]}){ray_note}; moving: {moved}")


if __name__ == "__main__":
    main()
