"""Giving a model built on the meta device its weights, only where this rank holds them.

A model built under `with torch.device("meta"):` has shapes but no storage, so a strategy
can shard it (fully_shard, a tensor plan) or cut its pipeline stages first and allocate
only what this rank keeps, as torchtitan does. The weights are then made one module at a
time: each module's `reset_parameters()` runs on a CPU copy of just its own tensors, from a
generator seeded by (the job's seed, the module's name), and each rank copies in the part
it holds. So every layout (one process, ddp, fsdp on 2 ranks, pp × tp on 4...) starts from
the same weights, and no rank ever holds more than its share plus one module's tensors.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from .base import StrategyConfigError


def on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in _tensors(model))


def materialize(model: nn.Module, device) -> nn.Module:
    """The model on `device`: a model on the meta device gets its weights here (a sharded
    parameter only its local shard); any other model is moved to `device`.

    Collective when the model is on the meta device and a process group exists (the seed
    is rank 0's): every rank calls it. Parameters are new tensors afterwards: an optimizer
    built before must be rebuilt over them (`rebuild_optimizer`)."""
    if not on_meta(model):
        return model.to(device)
    seed = _shared_seed()
    born_on_meta = [(name, m) for name, m in model.named_modules()
                    if any(t.device.type == "meta" for t in _own_tensors(m))]
    for name, module in born_on_meta:
        if not callable(getattr(module, "reset_parameters", None)):
            raise StrategyConfigError(
                f"module {name or '<model>'!r} ({type(module).__name__}) was built on the meta device but has "
                "no reset_parameters() to initialise its own tensors; give it one, or build the model on a "
                "real device")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, module in born_on_meta:
            _initialise(module, module_seed(seed, name))
    return model


def module_seed(seed: int, name: str) -> int:
    """A module's own seed: stable across processes and layouts (unlike Python's hash)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def materialize_replica(model: nn.Module, optimizer, device):
    """For strategies that hold the whole model on each rank (ddp, horovod): the model on
    `device`, and the optimizer over its parameters (rebuilt if they were on meta)."""
    was_meta = on_meta(model)
    old_names = {id(p): n for n, p in model.named_parameters()}
    model = materialize(model, device)
    if was_meta and optimizer is not None:
        optimizer = rebuild_optimizer(optimizer, old_names, model)
    return model, optimizer


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old_names: dict[int, str],
                      model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer over the model's new (sharded, materialised) parameters, matched by
    name.

    fully_shard swaps each parameter for a sharded one (and materialising a meta model makes
    new ones), so an optimizer built before `prepare` would update tensors the model no
    longer uses."""
    new_params = dict(model.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        # a pipeline stage holds only some of the parameters: the others are not this rank's
        params = [new_params[old_names[id(p)]] for p in group["params"] if old_names[id(p)] in new_params]
        if params:
            groups.append({**settings, "params": params})
    # every setting travels in the groups (the constructor's defaults may hold keys
    # that the constructor itself does not take, e.g. AdamW's decoupled_weight_decay)
    return type(optimizer)(groups)


def _tensors(model: nn.Module):
    return [*model.parameters(), *model.buffers()]


def _own_tensors(module: nn.Module):
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _shared_seed() -> int:
    """The seed the user set with torch.manual_seed, as rank 0 has it: ranks that were not
    seeded alike must still agree (a replicated bias, the two halves of one weight)."""
    import torch.distributed as dist

    seed = torch.initial_seed() % 2**63
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(value, src=0)
        seed = int(value.item())
    return seed


def _initialise(module: nn.Module, seed: int) -> None:
    """`module.reset_parameters()` on a CPU copy of its own tensors (whole, not sharded),
    then each of the module's tensors takes the part this rank holds."""
    shell = copy.copy(module)
    shell._modules = {}  # reset_parameters initialises the module's own tensors only
    # device="cpu" even under a `with torch.device(...)` block around the caller
    shell._parameters = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad)
                         for n, p in module._parameters.items() if p is not None}
    shell._buffers = {n: torch.empty(b.shape, dtype=b.dtype, device="cpu")
                      for n, b in module._buffers.items() if b is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shell.reset_parameters()
    for n, whole in [*shell._parameters.items(), *shell._buffers.items()]:
        _copy_held_part(getattr(module, n), whole.detach())


def _copy_held_part(target: torch.Tensor, whole: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # every rank made the same whole tensor: each cuts out its own shard, no communication
        local = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local()
        held = target.to_local()
        if held.shape != local.shape:
            raise RuntimeError(f"shard of shape {tuple(held.shape)} cannot take {tuple(local.shape)}")
        held.copy_(local)
    else:
        target.copy_(whole)
