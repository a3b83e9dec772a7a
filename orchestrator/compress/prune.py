"""Pruning passes: global unstructured L1 magnitude, and structured channel/neuron removal."""

from __future__ import annotations

from .optional import require

PRUNABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def _prunable(model, ignore: set[str]):
    from torch import nn

    kinds = tuple(getattr(nn, k) for k in PRUNABLE)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds) and name not in ignore]


def l1_unstructured(model, amount: float, ignore: list[str], finetune=None) -> dict:
    """Zero the `amount` smallest-magnitude weights over all Linear/Conv layers together.

    The masks stay on during the optional fine-tune, then are made permanent (prune.remove)."""
    from torch.nn.utils import prune

    targets = [(m, "weight") for _, m in _prunable(model, set(ignore))]
    if not targets:
        raise ValueError("l1_unstructured: the model has no Linear or Conv layer to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    info = {"layers": len(targets)}
    if finetune is not None:
        info["finetune_loss"] = round(finetune(model), 5)
    for module, name in targets:
        prune.remove(module, name)
    return info


def _output_layer(model, example_inputs):
    """The last Linear/Conv in forward order: its outputs are the model's, never pruned."""
    import torch

    order = []
    handles = [m.register_forward_hook(lambda mod, *_: order.append(mod))
               for _, m in _prunable(model, set())]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def l1_structured(model, amount: float, ignore: list[str], example_inputs: tuple, hooks=None,
                  finetune=None, round_to: int | None = None) -> dict:
    """Remove `amount` of the channels/neurons of each prunable group, by group L1 norm
    (torch-pruning's dependency graph keeps coupled layers consistent)."""
    from torch import nn

    tp = require("torch_pruning")
    named = dict(model.named_modules())
    ignored = [named[n] for n in ignore if n in named]
    out = _output_layer(model, example_inputs)
    if out is not None:
        ignored.append(out)
    if hooks is not None and hooks.prune_ignore is not None:
        ignored += list(hooks.prune_ignore(model))
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=amount, ignored_layers=ignored, root_module_types=[nn.Linear, nn.modules.conv._ConvNd],
        round_to=round_to,
    )
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    info = {"params_before": before, "params_after": after}
    if finetune is not None:
        info["finetune_loss"] = round(finetune(model), 5)
    return info
