"""Find a strategy class by name, by entry point, or by `pkg.mod:Class`."""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import Strategy, StrategyConfigError
from .refs import RefError, load_ref

ENTRY_POINT_GROUP = "trainctl.strategies"

# Built-ins by import path, so naming a strategy does not import torch or DeepSpeed.
_BUILTIN: dict[str, str] = {
    "ddp": "strategies.ddp:DDPStrategy",
    "fsdp": "strategies.fsdp:FSDPStrategy",
    "tensor": "strategies.tensor:TensorParallelStrategy",
    "pipeline": "strategies.pipeline:PipelineStrategy",
    "hybrid": "strategies.hybrid:HybridStrategy",
    "deepspeed": "strategies.deepspeed:DeepSpeedStrategy",
    "horovod": "strategies.horovod:HorovodStrategy",
}
_REGISTERED: dict[str, type[Strategy]] = {}


class UnknownStrategyError(StrategyConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def register(name: str):
    """Class decorator: `@register("mine")` makes `strategy: {name: mine}` work."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTERED[name] = cls
        return cls

    return decorate


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED) | set(_entry_points()))


def _import_path(path: str) -> type[Strategy]:
    try:
        cls = load_ref(path)
    except RefError as exc:
        raise UnknownStrategyError(f"strategy {path!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UnknownStrategyError(f"{path!r} is not a subclass of strategies.Strategy")
    return cls


def get_strategy_class(name: str) -> type[Strategy]:
    if ":" in name:
        return _import_path(name)
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _import_path(_BUILTIN[name])
    eps = _entry_points()
    if name in eps:
        cls = eps[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise UnknownStrategyError(f"entry point {name!r} is not a strategies.Strategy subclass")
        return cls
    raise UnknownStrategyError(
        f"unknown strategy {name!r}; available: {', '.join(available_strategies())}, "
        "or a 'pkg.module:Class' path"
    )
