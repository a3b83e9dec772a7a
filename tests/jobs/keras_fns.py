"""Training functions for the early-stopping / best-checkpoint / tracking tests."""

from __future__ import annotations

import time

import torch
from torch import nn


def peaks(ctx) -> None:
    """A score that rises to its peak at epoch `peak`, then falls for ever: only early stopping
    ends this job (after `epochs`, a fallback so a broken stopper fails the test, not hangs)."""
    cfg = {"epochs": 200, "steps": 3, "peak": 2, "step_s": 0.05, **ctx.config}
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    model, optimizer = ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    restored = ctx.restore({"model": model})
    start = restored["epoch"] + 1 if restored else 0
    for epoch in range(start, cfg["epochs"]):
        for i in range(cfg["steps"]):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            ctx.report({"step": epoch * cfg["steps"] + i + 1, "loss": loss.detach(), "samples": 8})
            time.sleep(cfg["step_s"])  # the job's "work": reports reach the supervisor meanwhile
        score = 1.0 - abs(epoch - cfg["peak"]) / 10
        ctx.report({"step": (epoch + 1) * cfg["steps"], "epoch": epoch, "score": score},
                   checkpoint={"model": model, "epoch": epoch})
