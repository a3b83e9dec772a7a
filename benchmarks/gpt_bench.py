"""The GPT example's training loop, instrumented: step times, peak memory, per-rank bytes.

Run by benchmarks/strategies.py under trainctl (entrypoint `trainctl_main`) and,
as a script, under torchrun as the bare-DDP baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from examples.gpt.model import GPT, GPTConfig, lm_loss, token_loss  # noqa: E402
from strategies.base import local_state_bytes  # noqa: E402

MODEL = dict(layers=4, heads=4, dim=192)



def _loop(model, optimizer, batches, steps: int, backward) -> list[float]:
    stamps = []
    it = iter(batches)
    for _ in range(steps):
        tokens = next(it)["tokens"].long()
        loss = lm_loss(model, tokens)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        stamps.append(time.perf_counter())
    return stamps


def _write(out: str, rank: int, stamps: list[float], warmup: int, model, optimizer, held: int | None = None,
           tokens_per_step: int | None = None) -> None:
    from benchmarks.gpu_throughput import mfu, peak_flops

    steady = stamps[warmup:]
    gaps = sorted(b - a for a, b in zip(steady, steady[1:], strict=False))
    steps_per_s = (len(steady) - 1) / (steady[-1] - steady[0])
    # MFU where the model trains on a GPU: 6 * parameters * this rank's tokens/s / peak bf16 flops
    # (the whole model's parameters: a data-parallel rank's share of the work)
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = steps_per_s * tokens_per_step if tokens_per_step else None
    on_gpu = torch.cuda.is_available() and next(model.parameters()).is_cuda
    peak = peak_flops(torch.cuda.get_device_name()) if on_gpu else None
    result = {
        "steps_per_s": steps_per_s,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(params, tokens_per_s, peak) if tokens_per_s else None,
        "step_ms_p50": 1e3 * gaps[len(gaps) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_optim_mb": (local_state_bytes(model, optimizer) if held is None else held) / 2**20,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def trainctl_main(ctx) -> None:
    cfg = ctx.config
    torch.manual_seed(0)
    data = ctx.dataset("train", device=ctx.device)  # batches where the model is, copied ahead
    model = GPT(GPTConfig(seq=data.manifest.schema.field("tokens").type.list_size - 1, **MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = ctx.prepare(model, optimizer)
    stamps = []
    for _, batch in zip(range(cfg["steps"]), data, strict=False):
        tokens = batch["tokens"].long()  # the strategy's step: a pipeline runs its schedule
        ctx.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
        stamps.append(time.perf_counter())
    # a strategy that knows its own partitions (deepspeed: ZeRO shards, fp32 master copy) counts them
    held = ctx.strategy.local_state_bytes()["total"] if hasattr(ctx.strategy, "local_state_bytes") else None
    _write(cfg["out"], ctx.rank, stamps, cfg["warmup"], model, optimizer, held,
           tokens_per_step=data.batch_size * (data.manifest.schema.field("tokens").type.list_size - 1))


def torchrun_main() -> None:
    """Bare DDP under torchrun: what users write without an orchestrator."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.data.loader import ShardedDataset

    p = argparse.ArgumentParser()
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--batch", type=int)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = ShardedDataset(a.data, batch_size=a.batch, shuffle=True, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq=data.manifest.schema.field("tokens").type.list_size - 1, **MODEL))
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stamps = _loop(model, optimizer, data, a.steps, lambda loss: loss.backward())
    _write(a.out, rank, stamps, a.warmup, model, optimizer,
           tokens_per_step=a.batch * (data.manifest.schema.field("tokens").type.list_size - 1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()
