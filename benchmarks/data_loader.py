"""Data loading throughput: trainctl's loader beside raw pyarrow, torch DataLoader and Ray Data.

    .venv/bin/python benchmarks/data_loader.py [--rows 1000000] [--dim 32] [--batch 256] [--repeat 5] [--json OUT]

All read the same generated rows (a fixed-size float32 vector plus an int64 label),
batch 256, into torch tensors, in one run:
  raw pyarrow    memory-mapped IPC shards, record batches -> torch (the ceiling)
  trainctl       ShardedDataset unshuffled (prefetch: 4, the default, and prefetch: 0), and
                 shuffled (unshuffled batches of fixed-width columns are views of the mapped
                 shards: both unshuffled modes build them in the training thread); each run
                 a new dataset, which finds the shards open if the process opened them
                 before (as a training loop's next epoch or trial does), and once more
                 with the shards opened afresh each run ("first open")
  torch          DataLoader over a map-style Dataset, 2 worker processes
  Ray Data       read_parquet(...).iter_torch_batches()
Plus: time to the first batch of a 1,000-shard dataset, and the data stall of
trainctl's loader when each training step takes twice the loader's per-batch time.
The fast ones (raw pyarrow and trainctl) run --repeat times, interleaved so that load
from elsewhere hits them alike; their median and range are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
from orchestrator.data.reader import OPEN_SHARDS  # noqa: E402
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


def run(batches) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    seen = 0
    first = None
    for batch in batches:
        seen += len(batch["label"])
        if first is None:
            first = time.perf_counter() - start
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    # samples per CPU second of this process (all its threads): steadier than wall time
    # when other work shares the cores
    return {"samples_per_s": seen / took, "samples_per_cpu_s": seen / cpu, "first_batch_s": first, "samples": seen}


def report(name: str, runs: list[dict]) -> dict:
    """The median run of several (by samples/s), with the range."""
    rates = [r["samples_per_s"] for r in runs]
    median = statistics.median(rates)
    cpu = statistics.median(r["samples_per_cpu_s"] for r in runs)
    spread = f"   range {min(rates) / 1e6:.1f}-{max(rates) / 1e6:.1f} M over {len(runs)} runs" if len(runs) > 1 else ""
    first = statistics.median(r["first_batch_s"] for r in runs)
    print(f"  {name:30s} {median:12,.0f} samples/s ({cpu / 1e6:5.1f} M per CPU s)   first batch {first:.3f}s   "
          f"({runs[0]['samples']} samples){spread}", flush=True)
    return {"samples_per_s": median, "samples_per_cpu_s": cpu, "first_batch_s": first,
            "samples": runs[0]["samples"], "runs_samples_per_s": rates}


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


def stall(path: str, batch: int) -> dict:
    """Each step 'trains' (sleeps, as a GPU step frees the CPU) for twice the loader's
    per-batch time, measured over a whole shuffled epoch. The stall is the loader wait
    over the rest of an epoch once the first batch is in (that one is startup: shards
    opened, the first shuffle window read; see the first-batch times above)."""
    probe = ShardedDataset(path, batch_size=batch, shuffle=True, prefetch=4)
    start = time.perf_counter()
    steps = sum(1 for _ in probe)
    per_batch = (time.perf_counter() - start) / steps
    ds = ShardedDataset(path, batch_size=batch, shuffle=True, seed=1, prefetch=4)
    batches = iter(ds)
    next(batches)
    first = ds.wait_seconds
    start = time.perf_counter()
    for _batch in batches:
        time.sleep(2 * per_batch)
    total = time.perf_counter() - start
    waited = ds.wait_seconds - first
    print(f"  step = 2 x {per_batch * 1e3:.3f} ms, {steps} steps: loader wait {waited:.3f}s of {total:.2f}s "
          f"= {waited / total:.2%} stall (goal <= 2%; first batch {first * 1e3:.1f} ms)", flush=True)
    return {"per_batch_s": per_batch, "steps": steps, "stall": waited / total, "first_batch_wait_s": first}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows-per-shard", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5, help="runs of raw pyarrow and trainctl (medians)")
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
        fast = {  # name -> (label, what makes its batches)
            "raw_pyarrow": ("raw pyarrow (ceiling)", lambda: raw_pyarrow(arrow, args.batch)),
            "trainctl": ("trainctl unshuffled", lambda: ShardedDataset(str(arrow), batch_size=args.batch)),
            "trainctl_inline": ("trainctl unshuffled, inline", lambda: ShardedDataset(
                str(arrow), batch_size=args.batch, prefetch=0)),
            "trainctl_shuffled": ("trainctl shuffled", lambda: ShardedDataset(
                str(arrow), batch_size=args.batch, shuffle=True, prefetch=8)),
            "trainctl_parquet": ("trainctl unshuffled parquet", lambda: ShardedDataset(
                str(parquet), batch_size=args.batch)),
            # A process opens a shard once (reader.OPEN_SHARDS): the rows above after the first
            # run find them open, as a training loop's next dataset does. This one opens them
            # every time, as a process's first dataset on them does.
            "trainctl_cold": ("trainctl unshuffled, first open", lambda: (OPEN_SHARDS.clear(), ShardedDataset(
                str(arrow), batch_size=args.batch))[1]),
        }
        runs: dict[str, list] = {name: [] for name in fast}
        for _ in range(args.repeat):
            for name, (_label, make) in fast.items():
                runs[name].append(run(make()))
        for name, (label, _make) in fast.items():
            results[name] = report(label, runs[name])
        loader = torch.utils.data.DataLoader(MapStyle(arrow), batch_size=args.batch, num_workers=2,
                                             shuffle=True, persistent_workers=False)
        results["torch_dataloader"] = report("torch DataLoader (2 workers)", [run(loader)])
        if not args.skip_ray:
            try:
                import ray
                import ray.data  # needs pandas, which trainctl itself does not
            except ImportError as exc:
                print(f"  Ray Data iter_torch_batches      skipped: {exc} (pip install 'ray[data]')", flush=True)
            else:
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
                ds = ray.data.read_parquet(str(parquet))
                results["ray_data"] = report("Ray Data iter_torch_batches",
                                             [run(ds.iter_torch_batches(batch_size=args.batch))])
                ray.shutdown()
        start = time.perf_counter()
        first = next(iter(ShardedDataset(str(many), batch_size=args.batch, shuffle=True)))
        results["first_batch_1000_shards_s"] = time.perf_counter() - start
        print(f"  first batch from a 1,000-shard dataset: {results['first_batch_1000_shards_s']:.3f}s "
              f"(goal < 1 s; {len(first['label'])} samples)", flush=True)
        results["stall"] = stall(str(arrow), args.batch)

        raw = results["raw_pyarrow"]["samples_per_s"]
        raw_cpu = results["raw_pyarrow"]["samples_per_cpu_s"]
        ratios = {  # name -> (value, goal)
            "unshuffled / raw": (results["trainctl"]["samples_per_s"] / raw, 2.0),
            "unshuffled inline / raw": (results["trainctl_inline"]["samples_per_s"] / raw, 2.0),
            # steadier than wall time when other work shares the cores
            "unshuffled / raw, per CPU second": (results["trainctl"]["samples_per_cpu_s"] / raw_cpu, None),
            "unshuffled inline / raw, per CPU s": (results["trainctl_inline"]["samples_per_cpu_s"] / raw_cpu, None),
            "first open / raw": (results["trainctl_cold"]["samples_per_s"] / raw, None),
            "first open / raw, per CPU second": (results["trainctl_cold"]["samples_per_cpu_s"] / raw_cpu, None),
            "shuffled / raw": (results["trainctl_shuffled"]["samples_per_s"] / raw, 0.6),
            "unshuffled / torch DataLoader": (results["trainctl"]["samples_per_s"]
                                              / results["torch_dataloader"]["samples_per_s"], None),
        }
        # Each repeat ran every loader once, back to back: the ratio within a repeat shares that
        # moment's load from elsewhere, which a ratio of medians (above) does not
        for name, label in (("trainctl", "unshuffled"), ("trainctl_inline", "unshuffled inline"),
                            ("trainctl_cold", "first open")):
            paired = [a["samples_per_cpu_s"] / b["samples_per_cpu_s"]
                      for a, b in zip(runs[name], runs["raw_pyarrow"], strict=True)]
            ratios[f"{label} / raw, per CPU s, paired"] = (statistics.median(paired), None)
            results[name]["paired_cpu_ratio_range"] = [min(paired), max(paired)]
        if "ray_data" in results:
            ratios["shuffled / Ray Data"] = (results["trainctl_shuffled"]["samples_per_s"]
                                             / results["ray_data"]["samples_per_s"], 2.0)
        ratios["shuffled / raw, per CPU second"] = (results["trainctl_shuffled"]["samples_per_cpu_s"] / raw_cpu, None)
        print("ratios:")
        for name, (value, goal) in ratios.items():
            verdict = "" if goal is None else f"   goal >= {goal:g}: {'met' if value >= goal else 'NOT met'}"
            print(f"  {name:32s} {value:6.2f}{verdict}")
        ratios = {name: value for name, (value, _goal) in ratios.items()}
        results["ratios"] = ratios
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
