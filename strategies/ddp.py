"""Data parallel with torch's DistributedDataParallel."""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn.parallel import DistributedDataParallel

from .base import ProcessGroupOptions, ProcessGroupStrategy, init_process_group
from .materialize import materialize_replica
from .registry import register

__all__ = ["DDPStrategy", "init_process_group"]  # init_process_group: where strategies found it first


@register("ddp")
class DDPStrategy(ProcessGroupStrategy):
    @dataclass
    class Options(ProcessGroupOptions):
        find_unused_parameters: bool = False
        bucket_cap_mb: float = 25.0
        gradient_as_bucket_view: bool = True
        static_graph: bool = False

    def prepare(self, model, optimizer=None):
        model, optimizer = materialize_replica(model, optimizer, self.device)  # a meta-built model gets its weights
        if self.env.world_size > 1:
            model = DistributedDataParallel(
                model,
                device_ids=[self.env.device_index] if self.env.use_gpu else None,
                find_unused_parameters=self.options.find_unused_parameters,
                bucket_cap_mb=self.options.bucket_cap_mb,
                gradient_as_bucket_view=self.options.gradient_as_bucket_view,
                static_graph=self.options.static_graph,
            )
        return model, optimizer
