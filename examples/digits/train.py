"""A small classifier on scikit-learn's bundled 8x8 digits (no download), data parallel.

The same function runs on every rank: each rank trains on its own share of the
training split; the held-out split is scored after every epoch, which is also
when a checkpoint is saved (and restored from after a failure).
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def load_split(seed: int):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    return X_train, X_test, y_train, y_test


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(X).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def train(ctx) -> None:
    cfg = {"epochs": 15, "lr": 0.1, "batch_size": 32, "hidden": 128, "seed": 0, **ctx.config}
    torch.manual_seed(cfg["seed"])
    X_train, X_test, y_train, y_test = load_split(cfg["seed"])
    # This rank's share: every world_size-th sample, so shares differ by at most one row;
    # truncating to the smallest share keeps every rank at the same number of steps.
    per_rank = len(X_train) // ctx.world_size
    X_mine, y_mine = X_train[ctx.rank::ctx.world_size][:per_rank], y_train[ctx.rank::ctx.world_size][:per_rank]

    model = make_model(cfg["hidden"])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    model, optimizer = ctx.prepare(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()

    start_epoch = 0
    restored = ctx.restore({"model": model, "optimizer": optimizer})
    if restored is not None:
        start_epoch = restored["epoch"] + 1

    batch = cfg["batch_size"]
    steps_per_epoch = per_rank // batch
    ctx.set_total_steps(cfg["epochs"] * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg["seed"])
    for epoch in range(start_epoch, cfg["epochs"]):
        generator.manual_seed(cfg["seed"] * 1000 + epoch)  # same order on a resumed epoch
        order = torch.randperm(per_rank, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = loss_fn(model(X_mine[idx]), y_mine[idx])
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            ctx.report({"step": epoch * steps_per_epoch + i + 1, "loss": loss.detach(), "samples": len(idx)})
        acc = accuracy(ctx.strategy.unwrap(model), X_test, y_test)
        if ctx.is_main:
            print(f"epoch {epoch}: loss {loss.item():.4f} held-out accuracy {acc:.4f}")
        ctx.report({"step": (epoch + 1) * steps_per_epoch, "epoch": epoch, "accuracy": acc},
                   checkpoint={"model": model, "optimizer": optimizer, "epoch": epoch})
