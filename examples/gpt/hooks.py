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


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Each attention's q/k/v projections and their number of heads: structured pruning
    removes whole heads from them (and the matching inputs of the output projection)."""
    return {proj: block.attn.q.out_features // block.attn.head_dim
            for block in model.blocks for proj in (block.attn.q, block.attn.k, block.attn.v)}


def prune_ignore(model: nn.Module) -> list[nn.Module]:
    """Structured pruning removes attention heads and MLP neurons; the residual width stays
    (embeddings, norms, the output projections' outputs and the head are kept whole)."""
    pruned = {m for block in model.blocks for m in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up)}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) and m not in pruned]
