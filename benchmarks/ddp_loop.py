"""The one DDP training loop that benchmarks/overhead.py runs under every launcher.

A fixed MLP on fixed-seed synthetic data, gloo, one thread per rank. Only the
launcher-specific glue differs: how the process group is joined and how the model
is wrapped (trainctl: `ctx.prepare`; torchrun: plain DDP; Ray Train: `prepare_model`),
always with the same DDP options.

Rank 0 writes a JSON result with wall-clock (`time.time()`) timestamps: when the
function was entered, when the model was wrapped, and after every optimizer step.

Entry points:
  trainctl:   benchmarks.ddp_loop:trainctl_main   (config: out, steps, warmup, ...)
  Ray Train:  benchmarks.ddp_loop.raytrain_main    (train_loop_config: the same keys)
  torchrun:   torchrun --nproc_per_node 2 benchmarks/ddp_loop.py --out F --steps N
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

# The model and the DDP options are shared by every launcher (these are also
# trainctl's DDP defaults, passed to it explicitly so a change of default does not
# silently change what is compared).
WIDTH = 1024
DEPTH = 2  # hidden Linear layers of WIDTH x WIDTH (~26 ms a step with 2 ranks on 2 cores)
IN_FEATURES = 1024
CLASSES = 10
BATCH = 64
N_BATCHES = 8  # distinct synthetic batches per rank, cycled
LR = 0.01
DDP_KWARGS = {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": True}
DEFAULTS = {"steps": 300, "warmup": 30, "seed": 0, "report_every": 1}


def _threads() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work already started) in this process
        pass


def build(rank: int, seed: int):
    """(model, optimizer, batches): identical weights on every rank, per-rank data."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    model = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    gen = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    batches = [
        (torch.randn(BATCH, IN_FEATURES, generator=gen),
         torch.randint(0, CLASSES, (BATCH,), generator=gen))
        for _ in range(N_BATCHES)
    ]
    return model, optimizer, batches


def train_steps(model, optimizer, batches, steps: int, backward: Callable,
                on_step: Callable[[int, object], None] | None = None) -> list[float]:
    """The timed loop; returns time.time() after each optimizer step."""
    import torch.nn.functional as F

    times: list[float] = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        optimizer.step()
        times.append(time.time())
        if on_step is not None:
            on_step(i, loss)
    return times


def process_start_time() -> float | None:
    """time.time() at which this process was created (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def write_result(out: str, system: str, world_size: int, cfg: dict, t_entered: float,
                 t_prepared: float, step_times: list[float], **extra) -> None:
    result = {
        "system": system, "world_size": world_size, "steps": cfg["steps"], "warmup": cfg["warmup"],
        "t_process_start": process_start_time(), "t_entered": t_entered, "t_prepared": t_prepared,
        "step_times": step_times, "pid": os.getpid(), **extra,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # the benchmark never reads a half-written file


def _cfg(raw: dict) -> dict:
    cfg = {**DEFAULTS, **raw}
    if "out" not in cfg:
        raise ValueError("the benchmark loop needs config 'out' (where rank 0 writes its result)")
    return cfg


# ---- trainctl ------------------------------------------------------------------------------

def trainctl_main(ctx) -> None:
    t_entered = time.time()
    _threads()
    cfg = _cfg(ctx.config)
    model, optimizer, batches = build(ctx.rank, cfg["seed"])
    model, optimizer = ctx.prepare(model, optimizer)
    batches = [(x.to(ctx.device), y.to(ctx.device)) for x, y in batches]  # where the model is (no-op on CPU)
    t_prepared = time.time()
    ctx.set_total_steps(cfg["steps"])
    every = int(cfg["report_every"])

    in_report = [0.0]  # seconds spent inside ctx.report (what the loop pays for metrics)

    def on_step(i: int, loss) -> None:
        if every and (i + 1) % every == 0:
            t = time.perf_counter()
            ctx.report({"step": i + 1, "loss": loss.detach(), "samples": BATCH})
            in_report[0] += time.perf_counter() - t

    times = train_steps(model, optimizer, batches, cfg["steps"], ctx.backward, on_step)
    if ctx.rank == 0:
        write_result(cfg["out"], "trainctl", ctx.world_size, cfg, t_entered, t_prepared, times,
                     report_s=in_report[0])


# ---- Ray Train -----------------------------------------------------------------------------

def raytrain_main(config: dict) -> None:
    t_entered = time.time()
    _threads()
    import ray.train
    import ray.train.torch

    cfg = _cfg(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model, optimizer, batches = build(rank, cfg["seed"])
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=dict(DDP_KWARGS))
    device = ray.train.torch.get_device()  # where prepare_model put the model
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    t_prepared = time.time()
    times = train_steps(model, optimizer, batches, cfg["steps"], lambda loss: loss.backward())
    if rank == 0:
        write_result(cfg["out"], "ray_train", world_size, cfg, t_entered, t_prepared, times)


# ---- torchrun ------------------------------------------------------------------------------

def torchrun_main(argv: list[str] | None = None) -> None:
    t_entered = time.time()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = parser.parse_args(argv)
    _threads()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = _cfg(vars(args))
    dist.init_process_group("gloo")  # env:// from torchrun (MASTER_ADDR/PORT, RANK, WORLD_SIZE)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, optimizer, batches = build(rank, cfg["seed"])
    model = DistributedDataParallel(model, **DDP_KWARGS)
    t_prepared = time.time()
    times = train_steps(model, optimizer, batches, cfg["steps"], lambda loss: loss.backward())
    if rank == 0:
        write_result(cfg["out"], "torchrun", world_size, cfg, t_entered, t_prepared, times)
    dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()
