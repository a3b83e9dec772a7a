"""A short fine-tune on the train split after pruning (pruned weights stay pruned)."""

from __future__ import annotations

import itertools


def finetune(model, hooks, batches, steps: int, lr: float) -> float:
    """`steps` AdamW steps of `hooks.loss(model, batch)`; returns the mean loss of the last 10."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in itertools.islice(batches, steps):
        optimizer.zero_grad()
        loss = hooks.loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-10:]
    return sum(tail) / len(tail) if tail else float("nan")
