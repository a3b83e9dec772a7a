"""Local SGD: a custom strategy written only against the public `strategies` API.

Each rank steps its own copy of the model on its own data, with no gradient traffic;
every `every` optimizer steps the ranks average their parameters (one all-reduce of
the weights instead of one per step). Use it from a job spec by path:

    strategy: {name: examples.custom_strategy.local_sgd:LocalSGD, options: {every: 4}}

or publish it under the `trainctl.strategies` entry point group of your package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from strategies import Layout, Strategy, StrategyConfigError, WorkerEnv
from strategies.ddp import init_process_group
from strategies.materialize import materialize_replica


class LocalSGD(Strategy):
    name = "local_sgd"

    @dataclass
    class Options:
        every: int = 4          # optimizer steps between parameter averages
        backend: str = "auto"
        timeout_s: float = 1800.0

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        if options.every < 1:
            raise StrategyConfigError(f"option 'every' must be at least 1, not {options.every}")

    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        init_process_group(env, self.options.backend, self.options.timeout_s)
        self.steps = 0

    def prepare(self, model, optimizer=None):
        model, optimizer = materialize_replica(model, optimizer, self.device)  # a meta-built model gets its weights
        for p in model.parameters():  # start from rank 0's weights
            dist.broadcast(p.data, src=0)
        if optimizer is not None:
            optimizer.register_step_post_hook(lambda *_: self._after_step(model))
        return model, optimizer

    @torch.no_grad()
    def _after_step(self, model) -> None:
        self.steps += 1
        if self.steps % self.options.every == 0:
            for p in model.parameters():
                dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
                p.data /= self.env.world_size
