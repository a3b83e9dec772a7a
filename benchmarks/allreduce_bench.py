"""All-reduce bus bandwidth through a strategy's collective (`ctx.all_reduce`: torch.distributed
for ddp, deepspeed.comm for deepspeed, hvd.allreduce_ for horovod) against a raw
`torch.distributed.all_reduce` over gloo on the same tensors, in the same job.

Run by benchmarks/strategies.py (entrypoint `trainctl_main`). Each size is measured in
alternating rounds (raw, strategy, raw, ...) so that load from elsewhere on the machine
hits both alike; the fastest round of each is kept (the one least disturbed by other
processes; the median is recorded too). Bus bandwidth as nccl-tests defines it:
bytes / time x 2(n-1)/n.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch

SIZES_MB = (0.25, 4, 32)
ROUNDS = 15


def _raw_group(ctx):
    """torch.distributed's default group: the strategy's own where it made one (ddp,
    deepspeed), else (horovod) a gloo group through the job's bootstrap store."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.PrefixStore("raw-allreduce", ctx.strategy._store)
        dist.init_process_group("gloo", store=store, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timedelta(minutes=10))
    return dist


def _time(op, tensor, iters: int) -> float:
    op(tensor)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        op(tensor)
    return (time.perf_counter() - start) / iters


def trainctl_main(ctx) -> None:
    dist = _raw_group(ctx)
    torch.set_num_threads(1)
    n = ctx.world_size
    results = []
    for mb in SIZES_MB:
        tensor = torch.zeros(int(mb * 2**20) // 4, dtype=torch.float32)
        iters = max(3, int(64 / mb)) if mb < 4 else 5
        raw, ours = [], []
        for _ in range(ROUNDS):
            dist.barrier()
            raw.append(_time(dist.all_reduce, tensor, iters))
            dist.barrier()
            ours.append(_time(lambda t: ctx.all_reduce(t, "sum"), tensor, iters))
        factor = tensor.numel() * 4 * 2 * (n - 1) / n / 1e9  # GB moved per second of all-reduce
        results.append({"mb": mb, "raw_gbps": factor / min(raw), "strategy_gbps": factor / min(ours),
                        "raw_gbps_median": factor / statistics.median(raw),
                        "strategy_gbps_median": factor / statistics.median(ours)})
    if ctx.rank == 0:
        Path(ctx.config["out"], "allreduce.json").write_text(json.dumps(results))
