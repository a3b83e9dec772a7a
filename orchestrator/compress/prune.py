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


def _per_attention(counts: dict) -> int | list[int]:
    values = sorted(set(counts.values()))
    return values[0] if len(values) == 1 else values


def _head_ratio(heads: int, amount: float) -> float:
    """torch-pruning removes ceil(ratio x heads) heads of an attention (0.3 of 4 would be 2);
    this ratio removes the whole number nearest to amount x heads, at least one, never all."""
    remove = min(max(round(amount * heads), 1), heads - 1)
    return (remove - 0.5) / heads


def l1_structured(model, amount: float, ignore: list[str], example_inputs: tuple, hooks=None,
                  finetune=None, round_to: int | None = None) -> dict:
    """Remove `amount` of the channels/neurons of each prunable group, by group L1 norm
    (torch-pruning's dependency graph keeps coupled layers consistent). Where the hooks name
    attention projections (attention_heads), whole heads go instead (the number nearest to
    amount x heads): the same heads from q, k and v, at full head width."""
    from torch import nn

    tp = require("torch_pruning")
    named = dict(model.named_modules())
    ignored = [named[n] for n in ignore if n in named]
    out = _output_layer(model, example_inputs)
    if out is not None:
        ignored.append(out)
    if hooks is not None and hooks.prune_ignore is not None:
        ignored += list(hooks.prune_ignore(model))
    heads = hooks.attention_heads(model) if hooks is not None and hooks.attention_heads is not None else {}
    ignored += [proj for proj, n in heads.items() if n < 2]  # a lone head stays whole
    heads = {proj: n for proj, n in heads.items() if n >= 2}
    before = sum(p.numel() for p in model.parameters())
    heads_before = _per_attention(heads) if heads else None  # torch-pruning updates `heads` in place
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=amount, ignored_layers=ignored, root_module_types=[nn.Linear, nn.modules.conv._ConvNd],
        round_to=round_to, num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False,
        head_pruning_ratio_dict={proj: _head_ratio(n, amount) for proj, n in heads.items()},
    )
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    info = {"params_before": before, "params_after": after}
    if heads:  # e.g. "4 -> 3" (per attention; a list where attentions differ)
        info["heads"] = f"{heads_before} -> {_per_attention(pruner.num_heads)}"
    if finetune is not None:
        info["finetune_loss"] = round(finetune(model), 5)
    return info
