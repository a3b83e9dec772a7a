"""Tensor parallel with DTensor: each listed Linear is split across the ranks, column-
or row-wise (Megatron style), so every rank holds 1/world of those weights and all
ranks work on the same batch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import ProcessGroupOptions, ProcessGroupStrategy, StrategyConfigError
from .materialize import materialize, rebuild_optimizer
from .refs import RefError, load_ref
from .registry import register

STYLES = ("colwise", "rowwise")


def _styles():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def resolve_plan(model: nn.Module, plan_ref: str | None, tp: int) -> dict[str, str]:
    """{module name: 'colwise' | 'rowwise'} from `pkg.mod:function(model, tp)`, or from the
    model's own `tensor_parallel_plan(tp)` method."""
    if plan_ref:
        try:
            plan_fn = load_ref(plan_ref)
        except RefError as exc:
            raise StrategyConfigError(f"tensor plan {plan_ref!r} cannot be loaded: {exc}") from None
    elif hasattr(model, "tensor_parallel_plan"):
        plan_fn = lambda model, tp: model.tensor_parallel_plan(tp)  # noqa: E731
    else:
        raise StrategyConfigError(
            f"{type(model).__name__} declares no tensor_parallel_plan(tp) method; give one, or name a "
            "plan function with strategy.options.plan: pkg.mod:function")
    try:
        plan = plan_fn(model, tp)
    except ValueError as exc:  # e.g. heads that do not split over tp ranks
        raise StrategyConfigError(f"tensor plan: {exc}") from None
    names = dict(model.named_modules())
    for name, style in plan.items():
        if name not in names:
            raise StrategyConfigError(f"tensor plan names module {name!r}, which the model does not have")
        if style not in STYLES:
            raise StrategyConfigError(f"tensor plan: module {name!r} has style {style!r}; use {' or '.join(STYLES)}")
    return plan


@register("tensor")
class TensorParallelStrategy(ProcessGroupStrategy):
    @dataclass
    class Options(ProcessGroupOptions):
        plan: str | None = None  # pkg.mod:function(model, tp) -> {module: colwise|rowwise}; default: the model's

    @classmethod
    def colocated_ranks(cls, options) -> int:
        # every rank is one tensor-parallel group: each layer all-reduces over all of them,
        # which must not cross the network (more ranks than a node holds: use hybrid's tp)
        return -1

    @classmethod
    def check_model(cls, model, layout, options) -> None:
        resolve_plan(model, options.plan, layout.world_size)

    @property
    def data_parallel_rank(self) -> int:
        return 0  # every rank holds a slice of the one replica: all read the same batches

    @property
    def data_parallel_size(self) -> int:
        return 1

    def prepare(self, model, optimizer=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        old_names = {id(p): n for n, p in model.named_parameters()}
        plan = resolve_plan(model, self.options.plan, self.env.world_size)
        mesh = init_device_mesh(self.device.type, (self.env.world_size,), mesh_dim_names=("tp",))
        styles = _styles()
        # split first, then on the device: the whole of a split Linear never lands there, and a
        # model built on the meta device is allocated only as this rank's slices
        parallelize_module(model, mesh, {name: styles[style]() for name, style in plan.items()})
        model = materialize(model, self.device)
        if optimizer is not None:
            optimizer = rebuild_optimizer(optimizer, old_names, model)
        return model, optimizer
