"""Fully sharded data parallel with FSDP2 (`fully_shard`): parameters, gradients and
optimizer state are split across ranks; each block is gathered only while it runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Layout, ProcessGroupOptions, ProcessGroupStrategy, StrategyConfigError
from .materialize import materialize, rebuild_optimizer
from .registry import register

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def blocks(model: nn.Module, class_names: list[str] | None) -> list[nn.Module]:
    """The units to shard one by one: named classes, else every member of an nn.ModuleList."""
    if class_names:
        return [m for m in model.modules() if type(m).__name__ in class_names]
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


@register("fsdp")
class FSDPStrategy(ProcessGroupStrategy):
    @dataclass
    class Options(ProcessGroupOptions):
        reshard_after_forward: bool = True       # free gathered weights after forward (less memory)
        mixed_precision: str | None = None       # bf16: compute in it, reduce in fp32
        cpu_offload: bool = False                # keep sharded params and optimizer state on CPU
        shard_classes: list[str] | None = None   # module classes that are one unit each (default: ModuleList members)

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        if options.mixed_precision == "fp16":
            # fp16 gradients underflow without a loss scaler, and trainctl's fsdp runs none
            raise StrategyConfigError("fsdp mixed_precision fp16 would train without a gradient scaler; use "
                                      "mixed_precision: bf16 (same memory, fp32's range)")
        if options.mixed_precision not in (None, *_DTYPES):
            raise StrategyConfigError(f"mixed_precision must be one of {', '.join(_DTYPES)} or null, "
                                      f"not {options.mixed_precision!r}")
        if options.cpu_offload and not layout.gpus_per_worker:
            raise StrategyConfigError("cpu_offload moves GPU memory to the CPU; it needs gpus_per_worker > 0")

    def prepare(self, model, optimizer=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        old_names = {id(p): n for n, p in model.named_parameters()}
        # Sharded first, then on the device: fully_shard moves one unit at a time to the mesh's
        # device and keeps its shard, so no rank ever holds the whole model there; a model built
        # on the meta device is allocated only as shards (see materialize.py)
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
        model = materialize(model, "cpu" if self.options.cpu_offload else self.device)
        if optimizer is not None:
            optimizer = rebuild_optimizer(optimizer, old_names, model)
        return model, optimizer
