"""Strategy plugins: how each rank wires its model, optimizer and collectives."""

from .base import Layout, Strategy, StrategyConfigError, WorkerEnv
from .registry import (
    ENTRY_POINT_GROUP,
    UnknownStrategyError,
    available_strategies,
    get_strategy_class,
    register,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Layout",
    "Strategy",
    "StrategyConfigError",
    "UnknownStrategyError",
    "WorkerEnv",
    "available_strategies",
    "get_strategy_class",
    "register",
]
