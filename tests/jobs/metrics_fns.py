"""A training function that exercises every metric: data, loss, lr, tokens, collectives, checkpoints.

It trains at a steady pace (`step_s` per step) until the file `gate` exists, so a test can
let Prometheus scrape a running job for as long as it needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


def steady(ctx) -> None:
    cfg = {"gate": None, "step_s": 0.02, "max_steps": 5000, "lr": 0.01, **ctx.config}
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    model, optimizer = ctx.prepare(model, optimizer)
    data = ctx.dataset("train")
    ctx.restore({"model": model, "optimizer": optimizer})
    ctx.set_total_steps(cfg["max_steps"])
    gate = Path(cfg["gate"]) if cfg["gate"] else None
    while ctx.step < cfg["max_steps"]:
        for batch in data:
            started = time.perf_counter()
            loss = model(batch["x"]).pow(2).mean()
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            if ctx.step % 5 == 0:
                ctx.all_reduce(torch.ones(1))
            time.sleep(max(0.0, cfg["step_s"] - (time.perf_counter() - started)))
            n = len(batch["id"])
            ctx.report({"loss": loss.detach(), "samples": n, "tokens": 4 * n, "lr": cfg["lr"]},
                       checkpoint={"model": model, "optimizer": optimizer})
            # every rank decides at the same step (the gate is checked after a collective)
            if gate is not None and ctx.step % 5 == 0:
                opened = torch.tensor([1.0 if gate.exists() else 0.0])
                if ctx.all_reduce(opened, "max").item() > 0:
                    return
            if ctx.step >= cfg["max_steps"]:
                return
