"""The GPT example's model on one GPU: trainctl's throughput against a bare loop, and MFU.

    python benchmarks/gpu_throughput.py [--data data/gpt-train] [--steps 300] [--warmup 30]

Both sides train the same model on the same shards in bf16 autocast: the bare loop is what a
user writes by hand (ShardedDataset, forward, backward, AdamW step); the trainctl side is a
1-worker job with `gpus_per_worker: 1` (strategy ddp) that also reports loss, samples and
tokens every step. Printed: tokens/s of both, the ratio (goal: >= 0.97 of the bare loop) and
MFU = 6 * parameters * tokens/s / the GPU's peak dense bf16 flops (a table by device name;
TRAINCTL_PEAK_FLOPS overrides it, e.g. 989e12). tests/gpu/test_50_throughput.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_RATIO = 0.97
MODEL = dict(layers=8, heads=16, dim=1024)  # ~100M parameters: enough work per step for the GPU
BATCH = 64
LR = 3e-4
# Peak dense bf16 tensor flops by device name (the first match wins: the PCIe parts first)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
)


def peak_flops(device_name: str, environ: dict | None = None) -> float | None:
    """Peak dense bf16 flops of a device: TRAINCTL_PEAK_FLOPS if set, else the table (None: unknown)."""
    env = os.environ if environ is None else environ
    if env.get("TRAINCTL_PEAK_FLOPS"):
        return float(env["TRAINCTL_PEAK_FLOPS"])
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_name.lower():
            return flops
    return None


def mfu(params: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model flops utilisation: 6 flops per parameter per token (forward + backward)."""
    return 6 * params * tokens_per_s / peak if peak else None


def _model(seq: int):
    import torch

    from examples.gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(seq=seq, **MODEL))


def _timed_steps(step, batches, steps: int, warmup: int, device) -> dict:
    """tokens/s over `steps` steps after `warmup`; the GPU is synchronised only at the two
    ends of the timed window, never inside it."""
    import torch

    tokens_seen = 0
    started = None
    done = 0
    while done < warmup + steps:
        for batch in batches:
            if done == warmup:
                torch.cuda.synchronize(device)
                started, tokens_seen = time.perf_counter(), 0
            tokens_seen += step(batch)
            done += 1
            if done == warmup + steps:
                break
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens_seen / seconds, "step_ms": 1e3 * seconds / steps}


def bare_main(data: str, out: str, steps: int, warmup: int, batch: int) -> None:
    """The loop a user writes by hand on one GPU (a child process: no Ray, no trainctl)."""
    import torch

    from examples.gpt.model import token_loss
    from orchestrator.data.loader import ShardedDataset

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ds = ShardedDataset(data, batch_size=batch, shuffle=True, seed=0, rank=0, world_size=1)
    model = _model(ds.manifest.schema.field("tokens").type.list_size - 1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(b) -> int:
        tokens = b["tokens"].long().to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return tokens[:, 1:].numel()

    result = _timed_steps(step, ds, steps, warmup, device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["device_name"] = torch.cuda.get_device_name(device)
    Path(out).write_text(json.dumps(result))


def trainctl_main(ctx) -> None:
    """The same model and loop as a trainctl job: ctx.train_step and a report every step."""
    import torch

    from examples.gpt.model import token_loss

    cfg = ctx.config
    data = ctx.dataset("train")
    model = _model(data.manifest.schema.field("tokens").type.list_size - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = ctx.prepare(model, optimizer)
    device = ctx.device

    def step(b) -> int:
        tokens = b["tokens"].long().to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ctx.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
        n = tokens[:, 1:].numel()
        ctx.report({"loss": loss, "samples": len(tokens), "tokens": n})  # read off the step
        return n

    result = _timed_steps(step, data, cfg["steps"], cfg["warmup"], device)
    if ctx.is_main:
        Path(cfg["out"]).write_text(json.dumps(result))


def run_bare(data: str, out_dir: Path, steps: int, warmup: int, batch: int = BATCH) -> dict:
    out = out_dir / f"bare-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", "--data", data, "--out", str(out),
           "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the bare loop failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_trainctl(client, data: str, out_dir: Path, steps: int, warmup: int, batch: int = BATCH) -> dict:
    out = out_dir / f"trainctl-{time.monotonic_ns()}.json"
    spec = {
        "name": "gpu-throughput", "entrypoint": "benchmarks.gpu_throughput:trainctl_main",
        "working_dir": str(ROOT), "config": {"steps": steps, "warmup": warmup, "out": str(out)},
        "resources": {"workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 1},
        "strategy": {"name": "ddp"},
        "data": {"train": {"path": data, "batch_size": batch, "shuffle": True, "seed": 0}},
        "checkpoint": {"storage": str(out_dir / "runs")}, "failure": {"max_restarts": 0},
    }
    job = client.wait(client.submit(spec), timeout_s=600)
    if job["state"] != "SUCCEEDED":
        logs, _ = client.read_logs(job["id"])
        raise RuntimeError(f"the trainctl job {job['state']}: {job.get('error')}\n{logs[-3000:]}")
    return json.loads(out.read_text())


def compare(client, data: str, out_dir: Path, steps: int = 300, warmup: int = 30,
            batch: int = BATCH) -> dict:
    """Bare loop, trainctl job, bare loop again (the faster bare run is the baseline)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bare = [run_bare(data, out_dir, steps, warmup, batch)]
    ours = run_trainctl(client, data, out_dir, steps, warmup, batch)
    bare.append(run_bare(data, out_dir, steps, warmup, batch))
    best = max(bare, key=lambda r: r["tokens_per_s"])
    peak = peak_flops(best["device_name"])
    return {
        "device": best["device_name"], "params": best["params"], "batch": batch, "peak_flops": peak,
        "bare_tokens_per_s": best["tokens_per_s"], "bare_runs": [r["tokens_per_s"] for r in bare],
        "trainctl_tokens_per_s": ours["tokens_per_s"],
        "bare_step_ms": best["step_ms"], "trainctl_step_ms": ours["step_ms"],
        "ratio": ours["tokens_per_s"] / best["tokens_per_s"],
        "mfu_bare": mfu(best["params"], best["tokens_per_s"], peak),
        "mfu_trainctl": mfu(best["params"], ours["tokens_per_s"], peak),
    }


def report_lines(r: dict) -> list[str]:
    def pct(x):
        return "n/a (unknown peak: set TRAINCTL_PEAK_FLOPS)" if x is None else f"{100 * x:.1f}%"

    return [
        f"GPT {r['params'] / 1e6:.1f}M params, batch {r['batch']}, bf16 autocast, on {r['device']}",
        f"  bare loop  {r['bare_tokens_per_s']:12,.0f} tokens/s  {r['bare_step_ms']:.2f} ms/step  MFU {pct(r['mfu_bare'])}",
        f"  trainctl   {r['trainctl_tokens_per_s']:12,.0f} tokens/s  {r['trainctl_step_ms']:.2f} ms/step  MFU {pct(r['mfu_trainctl'])}",
        f"  ratio      {r['ratio']:.3f} (goal >= {GOAL_RATIO})",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "gpt-train"))
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.bare:
        bare_main(a.data, a.out, a.steps, a.warmup, a.batch)
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TRAINCTL_METRICS_PORT", "0")
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from orchestrator.client.api import Client

    if not Path(a.data, "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "orchestrator", "data", "shard", "examples.gpt.data:gpt_train",
                        "--out", a.data], check=True, cwd=ROOT)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": torch.cuda.device_count()})
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    try:
        out_dir = Path(a.out or ROOT / "runs" / "gpu-throughput")
        result = compare(Client(cluster.address), a.data, out_dir, a.steps, a.warmup, a.batch)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("\n".join(report_lines(result)))
    print(json.dumps(result))
    return 0 if result["ratio"] >= GOAL_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
