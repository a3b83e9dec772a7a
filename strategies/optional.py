"""Optional heavy dependencies (deepspeed, horovod): found without importing them."""

from __future__ import annotations

import importlib.util


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (cheap, before reserving)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
