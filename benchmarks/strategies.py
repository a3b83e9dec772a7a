"""The GPT example under each strategy at world size 2, beside a bare torchrun DDP loop.

    .venv/bin/python benchmarks/strategies.py [--steps 60] [--warmup 10] [--batch 16]

Prints steps/s, step time p50, peak RSS and parameter+optimizer MB per rank, and
ratios against torchrun. One local Ray cluster (127.0.0.1) is started first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"}, "tensor": {"name": "tensor"},
              "pipeline": {"name": "pipeline", "options": {"schedule": "1f1b", "microbatches": 4}},
              "local_sgd": {"name": "examples.custom_strategy.local_sgd:LocalSGD", "options": {"every": 4}}}
# DeepSpeed at each ZeRO stage, and Horovod, beside ddp
STRATEGIES.update({f"deepspeed_z{z}": {"name": "deepspeed", "options": {"zero_stage": z}} for z in range(4)})
STRATEGIES["horovod"] = {"name": "horovod"}
# Horovod's background thread negotiates what to reduce once per cycle (default 1 ms): a longer
# cycle fuses more of a backward pass's gradients into each all-reduce
STRATEGIES["horovod_cycle10"] = {"name": "horovod", "options": {"cycle_time_ms": 10}}
# all-reduce bus bandwidth through each strategy's collective vs raw torch.distributed (gloo)
ALLREDUCE = {"ddp": {"name": "ddp"}, "deepspeed": {"name": "deepspeed"}, "horovod": {"name": "horovod"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(out: Path) -> dict:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {
        "steps_per_s": ranks[0]["steps_per_s"], "step_ms_p50": ranks[0]["step_ms_p50"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "param_optim_mb": max(r["param_optim_mb"] for r in ranks),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--only", help="comma-separated names to run (default: all), e.g. ddp,deepspeed_z3,horovod")
    p.add_argument("--no-allreduce", action="store_true", help="skip the all-reduce bandwidth comparison")
    args = p.parse_args(argv)
    import pyarrow as pa
    import ray

    from examples.gpt.data import corpus, sequences
    from orchestrator.client.api import Client
    from orchestrator.data.writer import shard_dataset

    scratch = Path(tempfile.mkdtemp(prefix="trainctl-strategies-"))
    results, allreduce = {}, {}
    try:
        table = sequences(corpus(1_000_000))
        with pa.OSFile(str(scratch / "src.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        data = scratch / "gpt"
        shard_dataset([str(scratch / "src.arrow")], str(data), rows_per_shard=5000)

        out = scratch / "torchrun"
        out.mkdir()
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), str(ROOT / "benchmarks" / "gpt_bench.py"),
                        "--data", str(data), "--out", str(out), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--batch", str(args.batch)],
                       check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        results["torchrun ddp"] = read(out)

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="trainctl")
        client = Client()
        for name, strategy in STRATEGIES.items():
            if args.only and name not in args.only.split(","):
                continue
            out = scratch / name
            out.mkdir()
            job = client.wait(client.submit({
                "name": f"bench-{name}".replace("_", "-"), "entrypoint": "benchmarks.gpt_bench:trainctl_main",
                "working_dir": str(ROOT), "strategy": strategy,
                "config": {"out": str(out), "steps": args.steps, "warmup": args.warmup},
                "resources": {"workers": 2, "cpus_per_worker": 1},
                "data": {"train": {"path": str(data), "batch_size": args.batch, "shuffle": True}},
                "checkpoint": {"storage": str(scratch / "runs")}, "failure": {"max_restarts": 0},
            }), timeout_s=900)
            if job["state"] != "SUCCEEDED":
                raise RuntimeError(f"{name}: {job['error']}")
            results[f"trainctl {name}"] = read(out)
        for name, strategy in ({} if args.no_allreduce else ALLREDUCE).items():
            out = scratch / f"allreduce-{name}"
            out.mkdir()
            job = client.wait(client.submit({
                "name": f"allreduce-{name}", "entrypoint": "benchmarks.allreduce_bench:trainctl_main",
                "working_dir": str(ROOT), "strategy": strategy, "config": {"out": str(out)},
                "resources": {"workers": 2, "cpus_per_worker": 1},
                "checkpoint": {"storage": str(scratch / "runs")}, "failure": {"max_restarts": 0},
            }), timeout_s=900)
            if job["state"] != "SUCCEEDED":
                raise RuntimeError(f"allreduce {name}: {job['error']}")
            allreduce[name] = json.loads((out / "allreduce.json").read_text())
        ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = results["torchrun ddp"]["steps_per_s"]
    print(f"GPT {args.batch}x64 tokens per rank, 2 ranks (gloo, 1 thread each), {args.steps} steps")
    print(f"{'':26s} {'steps/s':>8s} {'vs torchrun':>11s} {'p50 ms':>7s} {'peak RSS MB':>12s} {'param+optim MB':>15s}")
    for name, r in results.items():
        print(f"{name:26s} {r['steps_per_s']:8.2f} {r['steps_per_s'] / base:11.2f} {r['step_ms_p50']:7.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['param_optim_mb']:15.2f}")
    if allreduce:
        print("\nall-reduce bus bandwidth (GB/s), 2 ranks, gloo: the strategy's collective vs raw "
              "torch.distributed.all_reduce, same tensors, same job")
        for name, rows in allreduce.items():
            print(f"{name:10s} " + "   ".join(f"{r['mb']:g} MB: {r['strategy_gbps']:.2f} vs {r['raw_gbps']:.2f} "
                                            f"({r['strategy_gbps'] / r['raw_gbps']:.2f}x)" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "allreduce": allreduce}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
