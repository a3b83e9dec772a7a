"""Data parallel with torch's DistributedDataParallel."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy, WorkerEnv
from .registry import register


def init_process_group(env: WorkerEnv, backend: str, timeout_s: float) -> None:
    """Join the job's process group through MASTER_ADDR/PORT (torchrun's env:// rendezvous)."""
    if backend == "auto":
        backend = "nccl" if env.use_gpu else "gloo"
    if env.use_gpu:
        torch.cuda.set_device(env.device_index)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )


@register("ddp")
class DDPStrategy(Strategy):
    @dataclass
    class Options:
        backend: str = "auto"
        timeout_s: float = 1800.0
        find_unused_parameters: bool = False
        bucket_cap_mb: float = 25.0
        gradient_as_bucket_view: bool = True
        static_graph: bool = False

    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        init_process_group(env, self.options.backend, self.options.timeout_s)

    def prepare(self, model, optimizer=None):
        model = model.to(self.device)
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
