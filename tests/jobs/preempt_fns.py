"""Training functions of the preemption, drain and elastic tests and benchmark."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


def steady(ctx) -> None:
    """`steps` steps of about `step_s` each, passing its state at every report (trainctl's
    checkpoint.every_n_steps decides what is saved; a preemption saves at once). Each rank
    appends one line per step it ran to out/rank<R>.txt: `generation step world_size ids...`
    (generation: attempt.resumed_step, unique per group of ranks; ids: the batch's sample ids
    when `data` is set, from ctx.dataset("train"))."""
    cfg = {"steps": 100, "step_s": 0.05, "out": None, "data": False, **ctx.config}
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = ctx.prepare(model, optimizer)
    data = ctx.dataset("train") if cfg["data"] else None
    ctx.restore({"model": model, "optimizer": optimizer})  # the loader's position too
    batches = iter(data) if data is not None else None
    step, generation = ctx.step, f"{ctx.attempt}.{ctx.step}"
    ctx.set_total_steps(cfg["steps"])
    log = open(Path(cfg["out"]) / f"rank{ctx.rank}.txt", "a") if cfg["out"] else None
    while step < cfg["steps"]:
        started = time.perf_counter()
        if batches is not None:
            batch = next(batches, None)
            if batch is None:
                break
            x, ids = batch["x"], batch["id"].tolist()
        else:
            x, ids = torch.randn(8, 4), []
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        ctx.backward(loss)
        optimizer.step()
        step += 1
        if log is not None:
            log.write(f"{generation} {step} {ctx.world_size} {' '.join(map(str, ids))}\n")
            log.flush()
        time.sleep(max(0.0, cfg["step_s"] - (time.perf_counter() - started)))
        ctx.report({"step": step, "loss": loss.detach(), "samples": len(x), "world_size": ctx.world_size},
                   checkpoint={"model": model, "optimizer": optimizer})
