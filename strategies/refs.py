"""`pkg.module:attr` references (entrypoints, strategy classes, plan and stage functions, data
sources): one way to load them, and one error type whose text each caller wraps in its own words."""

from __future__ import annotations

import importlib
from typing import Any


class RefError(ValueError):
    """A `module:attr` reference that does not load; the text says why (bad form, no module, no attr)."""


def load_ref(ref: str) -> Any:
    """The object `pkg.module:attr` names (`attr` may be dotted: `mod:Class.method`)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise RefError(f"{ref!r} is not of the form pkg.module:name")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise RefError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RefError(f"module {module_name!r} has no {attr!r}") from None
    return obj
