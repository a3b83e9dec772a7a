"""Data loading throughput: trainctl's loader beside raw pyarrow, torch DataLoader and Ray Data.

    .venv/bin/python benchmarks/data_loader.py [--rows 1000000] [--dim 32] [--batch 256] [--json OUT]

All read the same generated rows (a fixed-size float32 vector plus an int64 label),
batch 256, into torch tensors, in one run:
  raw pyarrow    memory-mapped IPC shards, record batches -> torch (the ceiling)
  trainctl       ShardedDataset unshuffled (prefetch thread, and inline), and shuffled
  torch          DataLoader over a map-style Dataset, 2 worker processes
  Ray Data       read_parquet(...).iter_torch_batches()
Plus: time to the first batch of a 1,000-shard dataset, and the data stall of
trainctl's loader when each training step takes twice the loader's per-batch time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from orchestrator.data.loader import ShardedDataset  # noqa: E402
from orchestrator.data.writer import shard_dataset  # noqa: E402


def make_table(rows: int, dim: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(rows * dim, dtype=np.float32)), dim)
    return pa.table({"x": x, "label": pa.array(rng.integers(0, 10, rows, dtype=np.int64))})


def write(table: pa.Table, out: Path, fmt: str, rows_per_shard: int) -> None:
    src = out.parent / f"{out.name}-src.arrow"
    with pa.OSFile(str(src), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=65536)
    shard_dataset([str(src)], str(out), fmt, rows_per_shard, overwrite=True)
    src.unlink()


def timed(name: str, batches, rows: int) -> dict:
    start = time.perf_counter()
    seen = 0
    first = None
    for batch in batches:
        seen += len(batch["label"])
        if first is None:
            first = time.perf_counter() - start
    took = time.perf_counter() - start
    print(f"  {name:28s} {seen / took:12,.0f} samples/s   first batch {first:.3f}s   ({seen} samples)", flush=True)
    return {"samples_per_s": seen / took, "first_batch_s": first, "samples": seen}


def raw_pyarrow(path: Path, batch: int):
    for shard in sorted(path.glob("shard-*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
        for rb in table.to_batches(max_chunksize=batch):
            x = rb.column(0)
            yield {"x": torch.from_numpy(x.flatten().to_numpy(zero_copy_only=True).reshape(len(rb), -1)),
                   "label": torch.from_numpy(rb.column(1).to_numpy(zero_copy_only=True))}


class MapStyle(torch.utils.data.Dataset):
    """What users write by hand: index into arrays, let DataLoader collate."""

    def __init__(self, path: Path):
        tables = [pa.ipc.open_file(pa.memory_map(str(s))).read_all() for s in sorted(path.glob("shard-*.arrow"))]
        table = pa.concat_tables(tables).combine_chunks()
        self.x = table.column(0).chunk(0).flatten().to_numpy().reshape(table.num_rows, -1)
        self.y = table.column(1).chunk(0).to_numpy()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": torch.from_numpy(self.x[i].copy()), "label": int(self.y[i])}


def stall(path: str, batch: int, steps: int = 300) -> dict:
    """Each step 'trains' (sleeps, as a GPU step frees the CPU) for twice the loader's per-batch time."""
    probe = ShardedDataset(path, batch_size=batch, shuffle=True, prefetch=4)
    it = iter(probe)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    per_batch = (time.perf_counter() - start) / steps
    it.close()
    ds = ShardedDataset(path, batch_size=batch, shuffle=True, seed=1, prefetch=4)
    start = time.perf_counter()
    for i, _batch in enumerate(ds):
        time.sleep(2 * per_batch)
        if i + 1 == steps:
            break
    total = time.perf_counter() - start
    ratio = ds.wait_seconds / total
    print(f"  step = 2 x {per_batch * 1e3:.2f} ms: loader wait {ds.wait_seconds:.3f}s of {total:.2f}s "
          f"= {ratio:.2%} stall (goal <= 2%)", flush=True)
    return {"per_batch_s": per_batch, "stall": ratio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows-per-shard", type=int, default=50_000)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="trainctl-data-bench-"))
    results: dict = {"rows": args.rows, "dim": args.dim, "batch": args.batch}
    try:
        print(f"writing {args.rows:,} rows x {args.dim} float32 + label ...", flush=True)
        table = make_table(args.rows, args.dim)
        arrow, parquet, many = scratch / "arrow", scratch / "parquet", scratch / "many"
        write(table, arrow, "arrow", args.rows_per_shard)
        write(table, parquet, "parquet", args.rows_per_shard)
        write(table, many, "arrow", max(1, args.rows // 1000))
        del table
        print(f"batch {args.batch}:", flush=True)
        results["raw_pyarrow"] = timed("raw pyarrow (ceiling)", raw_pyarrow(arrow, args.batch), args.rows)
        results["trainctl"] = timed("trainctl unshuffled", ShardedDataset(str(arrow), batch_size=args.batch), args.rows)
        results["trainctl_inline"] = timed("trainctl unshuffled, inline", ShardedDataset(
            str(arrow), batch_size=args.batch, prefetch=0), args.rows)
        results["trainctl_shuffled"] = timed("trainctl shuffled", ShardedDataset(
            str(arrow), batch_size=args.batch, shuffle=True, prefetch=8), args.rows)
        results["trainctl_parquet"] = timed("trainctl unshuffled parquet", ShardedDataset(
            str(parquet), batch_size=args.batch), args.rows)
        loader = torch.utils.data.DataLoader(MapStyle(arrow), batch_size=args.batch, num_workers=2,
                                             shuffle=True, persistent_workers=False)
        results["torch_dataloader"] = timed("torch DataLoader (2 workers)", loader, args.rows)
        if not args.skip_ray:
            import ray

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            ds = ray.data.read_parquet(str(parquet))
            results["ray_data"] = timed("Ray Data iter_torch_batches",
                                        ds.iter_torch_batches(batch_size=args.batch), args.rows)
            ray.shutdown()
        start = time.perf_counter()
        first = next(iter(ShardedDataset(str(many), batch_size=args.batch, shuffle=True)))
        results["first_batch_1000_shards_s"] = time.perf_counter() - start
        print(f"  first batch from a 1,000-shard dataset: {results['first_batch_1000_shards_s']:.3f}s "
              f"(goal < 1 s; {len(first['label'])} samples)", flush=True)
        results["stall"] = stall(str(arrow), args.batch)

        raw = results["raw_pyarrow"]["samples_per_s"]
        ratios = {
            "unshuffled / raw (goal >= 0.9)": results["trainctl"]["samples_per_s"] / raw,
            "unshuffled inline / raw": results["trainctl_inline"]["samples_per_s"] / raw,
            "shuffled / raw (goal >= 0.6)": results["trainctl_shuffled"]["samples_per_s"] / raw,
            "unshuffled / torch DataLoader": results["trainctl"]["samples_per_s"]
            / results["torch_dataloader"]["samples_per_s"],
        }
        if "ray_data" in results:
            ratios["shuffled / Ray Data (goal >= 2)"] = (results["trainctl_shuffled"]["samples_per_s"]
                                                         / results["ray_data"]["samples_per_s"])
        print("ratios:")
        for name, value in ratios.items():
            print(f"  {name:36s} {value:6.2f}")
        results["ratios"] = ratios
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
