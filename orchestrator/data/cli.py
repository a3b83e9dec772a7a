"""`trainctl data shard` and `trainctl data inspect`."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import Progress

console = Console()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@click.group()
def data() -> None:
    """Write and describe sharded Arrow datasets."""


@data.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="output directory or URI (s3://bucket/path)")
@click.option("--format", "fmt", type=click.Choice(["arrow", "parquet"]), default="arrow", show_default=True)
@click.option("--rows-per-shard", type=int, default=100_000, show_default=True)
@click.option("--compression", default=None, help="lz4 or zstd (arrow); snappy, zstd, gzip... (parquet)")
@click.option("--overwrite", is_flag=True, help="replace what is in --out")
def shard(sources, out, fmt, rows_per_shard, compression, overwrite):
    """Shard SOURCES (Parquet, Arrow IPC, CSV, JSON lines, directories, or module:function)."""
    from .writer import shard_dataset

    with Progress(console=console, disable=not console.is_terminal, transient=True) as progress:
        task = progress.add_task("sharding", total=None)
        manifest = shard_dataset(list(sources), out, fmt, rows_per_shard, compression, overwrite=overwrite,
                                 progress=lambda rows: progress.advance(task, rows))
    click.echo(f"wrote {len(manifest.shards)} {fmt} shards, {manifest.num_rows} rows, "
               f"{_size(manifest.num_bytes)} to {out}")


@data.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="read every shard: sizes, checksums, decoding, schema")
@click.option("--json", "as_json", is_flag=True)
def inspect(path, verify, as_json):
    """Describe the dataset at PATH."""
    from .inspect import describe
    from .inspect import verify as check

    info = describe(path)
    problems = check(path) if verify else None
    if as_json:
        click.echo(json.dumps({**info, "problems": problems}, indent=2))
    else:
        click.echo(f"{path}: {info['format']}, {info['shards']} shards, {info['rows']} rows, {_size(info['bytes'])}")
        click.echo(info["schema"])
        if problems is not None:
            click.echo("verified: OK" if not problems else "\n".join(problems))
    if problems:
        sys.exit(1)
