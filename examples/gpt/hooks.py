"""Post-training hooks of the GPT example (see orchestrator/compress/hooks.py for the contract)."""

from __future__ import annotations

import torch
from torch import nn

from .model import token_loss
from .train import build_model  # noqa: F401  (the hooks contract: the model for a config)


def model_inputs(batch: dict) -> tuple:
    return (batch["tokens"][:, :-1].long(),)


def evaluate(model: nn.Module, batches) -> dict[str, float]:
    """Next-byte accuracy and mean cross entropy over the batches."""
    correct = total = 0
    loss_sum = 0.0
    for batch in batches:
        tokens = batch["tokens"].long()
        logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
        loss_sum += float(token_loss(logits, targets)) * targets.numel()
    return {"accuracy": correct / total, "loss": loss_sum / total}


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    tokens = batch["tokens"].long()
    return token_loss(model(tokens[:, :-1]), tokens[:, 1:])


def prune_ignore(model: nn.Module) -> list[nn.Module]:
    """Structured pruning removes MLP neurons only: the residual width and the attention
    heads stay (q/k/v/proj, norms, embeddings and the head are kept whole)."""
    ups = {block.mlp.up for block in model.blocks}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) and m not in ups]
