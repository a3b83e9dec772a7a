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


def crashes(ctx) -> None:
    """Checkpoints step 1, then rank `rank` dies by `how` ("segv": a NULL read, "abort":
    os.abort()) on the attempts listed in `attempts`; the other ranks wait in a collective."""
    import ctypes
    import os

    cfg = {"rank": 0, "how": "segv", "attempts": [0], **ctx.config}
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = ctx.prepare(model, optimizer)
    ctx.restore({"model": model, "optimizer": optimizer})
    ctx.report({"step": 1}, checkpoint={"model": model, "optimizer": optimizer})
    if ctx.rank == cfg["rank"] and ctx.attempt in cfg["attempts"]:
        print(f"about to crash by {cfg['how']}", flush=True)
        if cfg["how"] == "segv":
            ctypes.string_at(0)
        else:
            os.abort()
    ctx.barrier()
    ctx.report({"step": 2})


def writes_to_fds(ctx) -> None:
    """Writes below Python's sys.stdout/sys.stderr, as C++ libraries (NCCL) do."""
    import ctypes
    import os

    os.write(2, f"raw fd 2 from rank {ctx.rank}\n".encode())
    os.write(1, f"raw fd 1 from rank {ctx.rank}\n".encode())
    libc = ctypes.CDLL(None)
    libc.dprintf(2, b"libc dprintf rank %d\n", ctypes.c_int(ctx.rank))
    print(f"python print rank {ctx.rank}")
    print(f"nccl env {os.environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING')}")
    ctx.report({"step": 1})


def grows_checkpoints(ctx) -> None:
    """Checkpoint 1 holds `small` float32 values, checkpoint 2 `big` (e.g. more than the
    storage can take); after checkpoint 1 it holds until the file `gate` exists, if given.
    If checkpoint 2 fails, rank 0 deletes the file `filler` (if given) before raising."""
    cfg = {"small": 1000, "big": 1_000_000, "gate": None, "filler": None, **ctx.config}
    ctx.report({"step": 1}, checkpoint={"model": nn.Linear(cfg["small"], 1), "note": "small"})
    if cfg["gate"] and ctx.attempt == 0:
        _wait_for_file(cfg["gate"])
    try:
        ctx.report({"step": 2}, checkpoint={"model": nn.Linear(cfg["big"], 1), "note": "big"})
    except Exception:
        if cfg["filler"] and ctx.rank == 0:  # an operator frees space as the job fails
            Path(cfg["filler"]).unlink(missing_ok=True)
        raise


def normalises_in_place(ctx) -> None:
    """Two epochs of ctx.dataset("train") (on ctx.device), every batch normalised in place
    as training code does; checks each batch against the shard's values first (x[:, 0] ==
    id), so a write that leaked into a later read fails the job. Writes the ids each rank
    saw to `out`/rank<r>.txt."""
    cfg = {"epochs": 2, "out": None, **ctx.config}
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = ctx.prepare(model, optimizer)
    data = ctx.dataset("train", device=ctx.device)
    seen = []
    for _ in range(cfg["epochs"]):
        for batch in data:
            x, ids = batch["x"], batch["id"]
            if not torch.equal(x[:, 0], ids.to(x.dtype)):
                raise NonRetryableError(f"rank {ctx.rank} read changed data: ids {ids[:4].tolist()}, "
                                        f"x {x[:4, 0].tolist()}")
            seen += ids.tolist()
            x.sub_(x.mean(dim=0)).div_(x.std(dim=0) + 1e-6)  # in place, on the loader's tensor
            ids.mul_(-1)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            ctx.report({"loss": loss.detach(), "samples": len(x)})
    (Path(cfg["out"]) / f"rank{ctx.rank}.txt").write_text(" ".join(map(str, seen)))
