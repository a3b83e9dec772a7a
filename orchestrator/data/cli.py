"""`trainctl data shard` and `trainctl data inspect`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import click
import pyarrow as pa
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import UserError

console = Console(stderr=True)  # the progress bar; results go to stdout


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def _io_errors(where: str) -> Iterator[None]:
    """Storage failures (no bucket, no credentials, permission) as one line, not a traceback.
    DatasetError is a UserError already."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{where}: {exc}") from None


@click.group()
def data() -> None:
    """Write and describe sharded Arrow datasets."""


@data.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="output directory or URI (s3://bucket/path)")
@click.option("--format", "fmt", type=click.Choice(["arrow", "parquet"]), default="arrow", show_default=True)
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--compression", default=None, help="lz4 or zstd (arrow); snappy, zstd, gzip, brotli, lz4 (parquet)")
@click.option("--overwrite", is_flag=True, help="replace what is in --out")
def shard(sources, out, fmt, rows_per_shard, compression, overwrite):
    """Shard SOURCES (Parquet, Arrow IPC, CSV, JSON lines, directories, or module.path:function)."""
    from .writer import shard_dataset

    columns = (SpinnerColumn(), TextColumn("sharding to {task.description}"),
               TextColumn("{task.completed:,.0f} rows"), TimeElapsedColumn())
    with _io_errors(out), Progress(*columns, console=console, transient=True,
                                   disable=not console.is_terminal) as progress:
        task = progress.add_task(out, total=None)
        manifest = shard_dataset(list(sources), out, fmt, rows_per_shard, compression,
                                 overwrite=overwrite, progress=lambda rows: progress.advance(task, rows))
    click.echo(f"wrote {len(manifest.shards)} {fmt} shards, {manifest.num_rows} rows, "
               f"{_size(manifest.num_bytes)} to {out}")


@data.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="read every shard: size, sha256, decoding, schema; exit 1 on a problem")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(path, verify, as_json):
    """Describe the dataset at PATH (a directory or URI)."""
    from .inspect import describe
    from .inspect import verify as check

    with _io_errors(path):
        info = describe(path)
        problems = check(path) if verify else None
    if as_json:
        click.echo(json.dumps({**info, "problems": problems}, indent=2))
    else:
        _print(info, problems)
    if problems:
        sys.exit(1)


def _print(info: dict, problems: list[str] | None) -> None:
    created = datetime.fromtimestamp(info["created_at"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    click.echo(f"{info['path']}: {info['format']}, {info['shards']} shards, {info['rows']} rows, "
               f"{_size(info['bytes'])}, created {created}")
    click.echo(info["schema"])
    width = max(len(f["file"]) for f in info["files"]) if info["files"] else 4
    click.echo(f"{'file':<{width}}  {'rows':>10}  {'bytes':>12}  sha256")
    for f in info["files"]:
        click.echo(f"{f['file']:<{width}}  {f['rows']:>10}  {f['bytes']:>12}  {f['sha256'][:16]}")
    if problems is not None:
        click.echo("verified: OK" if not problems else f"{len(problems)} problem(s):")
        for p in problems:
            click.echo(f"  {p}")
