"""Fully sharded data parallel with FSDP2 (`fully_shard`): parameters, gradients and
optimizer state are split across ranks; each block is gathered only while it runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Layout, Strategy, StrategyConfigError, WorkerEnv
from .ddp import init_process_group
from .registry import register

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old_names: dict[int, str],
                      model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer over the model's new (sharded) parameters, matched by name.

    fully_shard swaps each parameter for a sharded one, so an optimizer built before
    `prepare` would update tensors the model no longer uses."""
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


def blocks(model: nn.Module, class_names: list[str] | None) -> list[nn.Module]:
    """The units to shard one by one: named classes, else every member of an nn.ModuleList."""
    if class_names:
        return [m for m in model.modules() if type(m).__name__ in class_names]
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


@register("fsdp")
class FSDPStrategy(Strategy):
    @dataclass
    class Options:
        backend: str = "auto"
        timeout_s: float = 1800.0
        reshard_after_forward: bool = True       # free gathered weights after forward (less memory)
        mixed_precision: str | None = None       # bf16 | fp16: compute in it, reduce in fp32
        cpu_offload: bool = False                # keep sharded params and optimizer state on CPU
        shard_classes: list[str] | None = None   # module classes that are one unit each (default: ModuleList members)

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        if options.mixed_precision not in (None, *_DTYPES):
            raise StrategyConfigError(f"mixed_precision must be one of {', '.join(_DTYPES)} or null, "
                                      f"not {options.mixed_precision!r}")
        if options.cpu_offload and not layout.gpus_per_worker:
            raise StrategyConfigError("cpu_offload moves GPU memory to the CPU; it needs gpus_per_worker > 0")

    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        init_process_group(env, self.options.backend, self.options.timeout_s)

    def prepare(self, model, optimizer=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        old_names = {id(p): n for n, p in model.named_parameters()}
        if not self.options.cpu_offload:
            model = model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        dtype = _DTYPES.get(self.options.mixed_precision)
        kwargs = dict(
            mesh=mesh, reshard_after_forward=self.options.reshard_after_forward,
            mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy(),
            offload_policy=CPUOffloadPolicy() if self.options.cpu_offload else OffloadPolicy(),
        )
        units = blocks(model, self.options.shard_classes)
        if self.options.shard_classes and not units:
            raise StrategyConfigError(f"shard_classes {self.options.shard_classes} match no module of the model")
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        if optimizer is not None:
            optimizer = rebuild_optimizer(optimizer, old_names, model)
        return model, optimizer
