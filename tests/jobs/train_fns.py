"""Training functions the integration tests submit (shipped with the repo's working_dir)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from orchestrator import NonRetryableError


def _wait_for_file(path: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {path} never appeared")
        time.sleep(0.05)


def gated(ctx) -> None:
    """Trains `epochs` epochs with a checkpoint each; on the first attempt it holds after
    epoch `hold_after` until the test creates the file `gate` (so the test can act mid-run)."""
    cfg = {"epochs": 4, "hold_after": 1, "gate": None, "steps": 5, **ctx.config}
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = ctx.prepare(model, optimizer)
    restored = ctx.restore({"model": model, "optimizer": optimizer})
    start_epoch = restored["epoch"] + 1 if restored else 0
    ctx.set_total_steps(cfg["epochs"] * cfg["steps"])
    for epoch in range(start_epoch, cfg["epochs"]):
        for i in range(cfg["steps"]):
            x = torch.randn(16, 8)
            loss = (model(x) - 1).pow(2).mean()
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            ctx.report({"step": epoch * cfg["steps"] + i + 1, "loss": loss.detach(), "samples": 16})
        print(f"finished epoch {epoch} (started at {start_epoch})")
        ctx.report({"step": (epoch + 1) * cfg["steps"], "epoch": epoch, "start_epoch": start_epoch},
                   checkpoint={"model": model, "optimizer": optimizer, "epoch": epoch})
        if cfg["gate"] and restored is None and epoch == cfg["hold_after"]:
            _wait_for_file(cfg["gate"])


def fails_fatally(ctx) -> None:
    raise NonRetryableError("bad data in shard 3")


def always_fails(ctx) -> None:
    raise ValueError(f"boom on attempt {ctx.attempt}")


def data_gated(ctx) -> None:
    """Reads ctx.dataset("train") for one epoch, recording the ids each rank sees per attempt.
    Checkpoints every `every` batches; on the first attempt it holds after the checkpoint
    at batch `hold_at` until the file `gate` exists."""
    cfg = {"every": 2, "hold_at": 4, "gate": None, "out": None, **ctx.config}
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = ctx.prepare(model, optimizer)
    data = ctx.dataset("train")
    restored = ctx.restore({"model": model, "optimizer": optimizer})
    log = Path(cfg["out"]) / f"rank{ctx.rank}-attempt{ctx.attempt}.txt"
    with open(log, "w") as f:
        for i, batch in enumerate(data, start=1):
            loss = model(batch["x"]).pow(2).mean()
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            f.write(" ".join(map(str, batch["id"].tolist())) + "\n")
            f.flush()
            due = i % cfg["every"] == 0
            ctx.report({"loss": loss.detach(), "samples": len(batch["id"])},
                       checkpoint={"model": model, "optimizer": optimizer} if due else None)
            if due:
                f.write("checkpoint\n")
                f.flush()
            if cfg["gate"] and restored is None and i == cfg["hold_at"]:
                _wait_for_file(cfg["gate"])
