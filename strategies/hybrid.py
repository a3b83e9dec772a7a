"""Mixed parallelism over a DeviceMesh of pipeline × data × tensor dimensions.

Built like torchtitan's `parallelize` functions, from small steps on the model:
split it into pipeline stages (`stages.py`), apply the tensor-parallel plan inside each
stage (`tensor.py`), and average gradients over the data-parallel dimension. The mesh
is ordered (pp, dp, tp), tensor innermost, so the ranks of a tensor-parallel group are
contiguous: with ranks laid out node by node (and `resources.colocate`), they share a
node and its fast links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import Layout, ProcessGroupOptions, ProcessGroupStrategy, StrategyConfigError, WorkerEnv
from .materialize import materialize, rebuild_optimizer
from .registry import register
from .stages import keep_only, load_stage_fn, stage_units
from .tensor import _styles, resolve_plan

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dimensions; their product is the world size."""

    pp: int
    dp: int
    tp: int

    @classmethod
    def resolve(cls, world_size: int, pp: int, dp: int, tp: int) -> ParallelDims:
        """-1 in one dimension means 'whatever is left of the world size'."""
        sizes = {"pp": pp, "dp": dp, "tp": tp}
        bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise StrategyConfigError(f"mesh sizes must be ≥ 1 (or -1 for the rest): {', '.join(bad)}")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise StrategyConfigError(f"only one mesh dimension may be -1, not {' and '.join(free)}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if world_size % fixed:
                raise StrategyConfigError(f"world size {world_size} is not divisible by the mesh "
                                          f"{_shape(sizes)}; set resources.workers to a multiple of {fixed}")
            sizes[free[0]] = world_size // fixed
        elif fixed != world_size:
            raise StrategyConfigError(f"the mesh {_shape(sizes)} has {fixed} ranks but the job has "
                                      f"{world_size} workers; make resources.workers {fixed}")
        return cls(**sizes)

    def mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))


def _shape(sizes: dict) -> str:
    return " × ".join(f"{k} {v}" for k, v in sizes.items())


@register("hybrid")
class HybridStrategy(ProcessGroupStrategy):
    @dataclass
    class Options(ProcessGroupOptions):
        dp: int = -1                          # data-parallel replicas (-1: the rest of the world size)
        tp: int = 1                           # tensor-parallel ranks per replica (one node)
        pp: int = 1                           # pipeline stages per replica
        plan: str | None = None               # tensor plan: pkg.mod:function(model, tp); default the model's
        split_points: list[str] | None = None  # modules that start a new stage; default: blocks split evenly
        stage_fn: str | None = None           # or pkg.mod:function(model, num_stages) -> [[module names], ...]
        schedule: str = "1f1b"                # gpipe | 1f1b | interleaved_1f1b
        microbatches: int = 4                 # each batch is cut into this many micro-batches
        stages_per_rank: int | None = None    # 1; 2 for interleaved_1f1b (virtual stages)

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        dims = ParallelDims.resolve(layout.world_size, options.pp, options.dp, options.tp)
        if options.schedule not in SCHEDULES:
            raise StrategyConfigError(f"schedule {options.schedule!r} is not one of {', '.join(SCHEDULES)}")
        per_rank = cls.stages_per_rank(options)
        if options.schedule == "interleaved_1f1b" and per_rank < 2:
            raise StrategyConfigError("interleaved_1f1b needs stages_per_rank ≥ 2")
        if options.schedule != "interleaved_1f1b" and per_rank != 1:
            raise StrategyConfigError(f"schedule {options.schedule} runs one stage per rank; "
                                      "use interleaved_1f1b for stages_per_rank > 1")
        if options.microbatches < 1:
            raise StrategyConfigError("microbatches must be at least 1")
        if dims.pp > 1 and options.schedule != "gpipe" and options.microbatches < dims.pp:
            raise StrategyConfigError(f"schedule {options.schedule} needs at least as many microbatches "
                                      f"as pipeline stages ({dims.pp}), not {options.microbatches}")
        if options.split_points and options.stage_fn:
            raise StrategyConfigError("give split_points or stage_fn, not both")

    @staticmethod
    def stages_per_rank(options) -> int:
        if options.stages_per_rank is not None:
            return options.stages_per_rank
        return 2 if options.schedule == "interleaved_1f1b" else 1

    @classmethod
    def colocated_ranks(cls, options) -> int:
        return max(options.tp, 1)

    @classmethod
    def check_model(cls, model, layout, options) -> None:
        dims = ParallelDims.resolve(layout.world_size, options.pp, options.dp, options.tp)
        if dims.tp > 1:
            resolve_plan(model, options.plan, dims.tp)
        if dims.pp > 1:
            split_model(model, options, dims.pp * cls.stages_per_rank(options))

    # ---- inside the worker ------------------------------------------------------------
    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)  # joins the process group
        o = self.options
        self.dims = ParallelDims.resolve(env.world_size, o.pp, o.dp, o.tp)
        self.mesh = self.dims.mesh(self.device.type)
        self.pp_rank = self.mesh["pp"].get_local_rank()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.num_stages = self.dims.pp * self.stages_per_rank(o)
        # stages are dealt round-robin: with 2 per rank, rank 0 holds stages 0 and pp
        self.my_stages = [s for s in range(self.num_stages) if s % self.dims.pp == self.pp_rank]
        self._model = None
        self._schedule = None

    @property
    def data_parallel_rank(self) -> int:
        return self.dp_rank if self.env else 0

    @property
    def data_parallel_size(self) -> int:
        return self.dims.dp if self.env else 1

    def prepare(self, model, optimizer=None):
        old_names = {id(p): n for n, p in model.named_parameters()}
        # Cut and split first, then on the device: this rank's stages, its slices of them (a
        # model built on the meta device is allocated only as these; see materialize.py)
        plan = resolve_plan(model, self.options.plan, self.dims.tp) if self.dims.tp > 1 else {}
        if self.dims.pp > 1:
            stage_lists = self.split(model, self.num_stages)
            keep_only(model, {u for s in self.my_stages for u in stage_lists[s]})
            plan = {name: style for name, style in plan.items() if _has_module(model, name)}
        if plan:
            from torch.distributed.tensor.parallel import parallelize_module

            styles = _styles()
            parallelize_module(model, self.mesh["tp"], {n: styles[s]() for n, s in plan.items()})
        model = materialize(model, self.device)
        if self.dims.pp > 1:
            from torch.distributed.pipelining import PipelineStage

            group = self.mesh["pp"].get_group()
            self._stages = [
                PipelineStage(keep_only(model, set(stage_lists[s]), copy_modules=True), s,
                              self.num_stages, self.device, group=group)
                for s in self.my_stages
            ]
        if optimizer is not None:
            optimizer = rebuild_optimizer(optimizer, old_names, model)
        self._model = model
        return model, optimizer

    def split(self, model, num_stages: int) -> list[list[str]]:
        return split_model(model, self.options, num_stages)

    def backward(self, loss) -> None:
        if self.dims.pp > 1:
            raise StrategyConfigError("under pipeline parallelism the schedule runs backward: call "
                                      "ctx.train_step(model, optimizer, inputs, targets, loss_fn)")
        loss.backward()
        self._average_gradients()

    def train_step(self, model, optimizer, inputs, targets, loss_fn):
        if self.dims.pp == 1:
            return super().train_step(model, optimizer, inputs, targets, loss_fn)
        optimizer.zero_grad()
        schedule = self._schedule_for(loss_fn)
        if inputs.shape[0] % self.options.microbatches:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into "
                             f"{self.options.microbatches} micro-batches; make data.*.batch_size a multiple")
        last = self.num_stages - 1 in self.my_stages
        losses: list = []
        args = (inputs,) if 0 in self.my_stages else ()
        schedule.step(*args, target=targets if last else None, losses=losses if last else None)
        loss = torch.stack(losses).mean().detach() if last else torch.zeros((), device=self.device)
        # every rank of the pipeline returns the loss its last stage computed
        group = self.mesh["pp"].get_group()
        dist.broadcast(loss, src=dist.get_global_rank(group, self.dims.pp - 1), group=group)
        self._average_gradients()
        optimizer.step()
        return loss

    def _schedule_for(self, loss_fn):
        """The schedule is built on first use: it needs the training function's loss_fn."""
        if self._schedule is None or self._schedule_loss is not loss_fn:
            from torch.distributed.pipelining import (
                Schedule1F1B,
                ScheduleGPipe,
                ScheduleInterleaved1F1B,
            )

            n = self.options.microbatches
            if self.options.schedule == "interleaved_1f1b":
                self._schedule = ScheduleInterleaved1F1B(self._stages, n_microbatches=n, loss_fn=loss_fn)
            else:
                cls = ScheduleGPipe if self.options.schedule == "gpipe" else Schedule1F1B
                self._schedule = cls(self._stages[0], n_microbatches=n, loss_fn=loss_fn)
            self._schedule_loss = loss_fn
        return self._schedule

    def _average_gradients(self) -> None:
        """Replicas of one model piece average their gradients (what DDP does, per piece)."""
        if self.dims.dp == 1 or self._model is None:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self._model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.mesh["dp"].get_group())
        flat /= self.dims.dp
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)


def split_model(model, options, num_stages: int) -> list[list[str]]:
    """Each stage's module names, from the stage function or the split points."""
    if options.stage_fn:
        stages = load_stage_fn(options.stage_fn)(model, num_stages)
        if len(stages) != num_stages:
            raise StrategyConfigError(f"stage_fn {options.stage_fn} made {len(stages)} stages, not {num_stages}")
        return stages
    return stage_units(model, options.split_points, num_stages)


def _has_module(model, name: str) -> bool:
    try:
        return model.get_submodule(name) is not None
    except AttributeError:
        return False
