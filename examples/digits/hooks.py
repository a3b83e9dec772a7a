"""Post-training hooks of the digits example (see orchestrator/compress/hooks.py for the contract)."""

from __future__ import annotations

from torch import nn

from .train import HIDDEN, make_model
from .train import evaluate as count_correct


def build_model(config: dict) -> nn.Module:
    return make_model(config.get("hidden", HIDDEN))


def evaluate(model: nn.Module, batches) -> dict[str, float]:
    correct, total = count_correct(model, batches)
    return {"accuracy": correct / total}


def model_inputs(batch: dict) -> tuple:
    return (batch["image"],)


def loss(model: nn.Module, batch: dict):
    return nn.functional.cross_entropy(model(batch["image"]), batch["label"])
