"""Splitting a model into pipeline stages at named modules, keeping parameter names.

A model's *units* are its top-level children in order, with the members of a top-level
`nn.ModuleList`/`nn.ModuleDict` counted one by one (GPT: tok, pos, blocks.0, blocks.1,
ln, head). A stage keeps a contiguous run of units and sets every other unit to None,
as torchtitan does, so the model's forward must skip a unit that is None (the GPT
example shows how). Parameter names stay those of the whole model, so a checkpoint
saved under a pipeline loads under any other layout and vice versa.
"""

from __future__ import annotations

import copy

from torch import nn

from .base import StrategyConfigError
from .refs import RefError, load_ref

CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def units(model: nn.Module) -> list[str]:
    """The model's units in order: top-level children, list/dict members one by one."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, CONTAINERS):
            out.extend(f"{name}.{member}" for member, _ in child.named_children())
        else:
            out.append(name)
    return out


def auto_split_points(model: nn.Module, num_stages: int) -> list[str]:
    """Split the model's longest module list into `num_stages` runs of (nearly) equal length."""
    lists = [(name, child) for name, child in model.named_children() if isinstance(child, CONTAINERS)]
    if not lists:
        raise StrategyConfigError(f"{type(model).__name__} has no nn.ModuleList of blocks to split; "
                                  "give strategy.options.split_points")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    members = [m for m, _ in blocks.named_children()]
    if len(members) < num_stages:
        raise StrategyConfigError(f"{len(members)} modules in {name} cannot make {num_stages} pipeline "
                                  "stages; use fewer stages or a deeper model")
    return [f"{name}.{members[(i * len(members)) // num_stages]}" for i in range(1, num_stages)]


def stage_units(model: nn.Module, split_points: list[str] | None, num_stages: int) -> list[list[str]]:
    """The units of each stage: a new stage begins at every split point (in model order)."""
    order = units(model)
    points = split_points if split_points else auto_split_points(model, num_stages)
    if len(points) != num_stages - 1:
        raise StrategyConfigError(f"{len(points)} split points make {len(points) + 1} pipeline stages, "
                                  f"but the layout has {num_stages}; give {num_stages - 1}")
    for point in points:
        if point not in order:
            raise StrategyConfigError(f"pipeline split point {point!r} is not a module of the model; "
                                      f"split at one of: {', '.join(order)}")
    starts = [order.index(p) for p in points]
    if starts != sorted(set(starts)) or starts[0] == 0:
        raise StrategyConfigError(f"pipeline split points {points} must be distinct, in model order, "
                                  f"and after the first module {order[0]!r}")
    bounds = [0, *starts, len(order)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def keep_only(module: nn.Module, keep: set[str], prefix: str = "", copy_modules: bool = False) -> nn.Module:
    """The module with every unit outside `keep` set to None.

    In place, or (copy_modules) as a shallow copy that shares the kept submodules, so two
    stages held by one rank (interleaved schedules) are views over one set of parameters."""
    target = copy.copy(module) if copy_modules else module
    if copy_modules:
        target._modules = dict(module._modules)
    for name, child in list(module._modules.items()):
        path = f"{prefix}{name}"
        if child is None or path in keep:
            continue
        if isinstance(child, CONTAINERS) or any(unit.startswith(path + ".") for unit in keep):
            # a block list stays a list (of Nones where the blocks are elsewhere) for forward
            target._modules[name] = keep_only(child, keep, path + ".", copy_modules)
        else:
            target._modules[name] = None
    return target


def load_stage_fn(ref: str):
    try:
        return load_ref(ref)
    except RefError as exc:
        raise StrategyConfigError(f"pipeline stage_fn {ref!r} cannot be loaded: {exc}") from None
