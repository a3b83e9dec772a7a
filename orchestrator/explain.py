"""Pydantic validation errors in words: the bad value, what the field allows, how to fix it.

Pydantic's own texts ("String should match pattern '^[A-Za-z0-9]...'", "Input should be a
valid dictionary or instance of Resources") name regexes and classes, not what a user can do;
this turns one error into the part of the one-line message after "file: field.path: ".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticUndefined

_INTEGER = {"int_parsing", "int_type", "int_from_float", "int_parsing_size"}
_NUMBER = {"float_parsing", "float_type"}
_BOOLEAN = {"bool_parsing", "bool_type"}
_MAPPING = {"dict_type", "model_type", "model_attributes_type", "dataclass_type"}
_LIST = {"list_type", "tuple_type"}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_BOUND_WORDS = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}


@dataclass(frozen=True)
class FieldAt:
    """What the model declares where an error is (a field has bounds and a default; a list
    item or mapping value has only a type)."""

    info: FieldInfo | None
    annotation: Any  # the type checked there, with `| None` removed


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        rest = [a for a in get_args(annotation) if a is not NoneType]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_at(model: type[BaseModel] | None, loc: tuple) -> FieldAt:
    """Walk `loc` (e.g. ('post_training', 'passes', 0, 'prune', 'amount')) through the models."""
    info, annotation = None, model
    for part in loc:
        annotation = _without_none(annotation)
        if _is_model(annotation):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return FieldAt(None, None)
            annotation = info.annotation
        elif get_origin(annotation) in (list, dict) and part != "[key]":
            info, annotation = None, get_args(annotation)[-1]  # an item, or a mapping's value
        else:
            return FieldAt(None, None)
    return FieldAt(info, _without_none(annotation))


def field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed at `loc` (for 'unknown field' hints)."""
    annotation = field_at(model, loc).annotation
    return sorted(annotation.model_fields) if _is_model(annotation) else []


def dotted(loc: tuple) -> str:
    """('data', 'train', 'path') -> data.train.path; a mapping key's error names the mapping."""
    if loc and loc[-1] == "[key]":
        loc = loc[:-2]
    return ".".join(str(p) for p in loc)


def shown(value: Any) -> str:
    """The offending value as the user wrote it (YAML words), short enough for one line."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"{value[:37] + '...'!r} ({len(value)} characters)"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = str(value)  # e.g. a date, as YAML wrote it
    return text if len(text) <= 60 else text[:57] + "..."


def kind_of(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # e.g. a date: YAML reads 2024-01-01 as one


def _example(at: FieldAt, kind: type) -> str:
    default = at.info.default if at.info else None
    if default is PydanticUndefined or isinstance(default, bool) or not isinstance(default, kind):
        return ""
    return f", e.g. {default:g}" if isinstance(default, float) else f", e.g. {default}"


def _bounds(at: FieldAt, ctx: dict) -> str:
    found = {key: getattr(m, key) for m in (at.info.metadata if at.info else [])
             for key in _BOUND_WORDS if getattr(m, key, None) is not None} or ctx
    return " and ".join(f"{_BOUND_WORDS[k]} {v:g}" for k, v in found.items() if k in _BOUND_WORDS)


def _choices(at: FieldAt, ctx: dict) -> str:
    if get_origin(at.annotation) is Literal:
        values = [str(v) for v in get_args(at.annotation)]
        return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
    return ctx.get("expected", "?")


def problem(err: ErrorDetails, model: type[BaseModel] | None = None) -> str:
    """What is wrong with the value at err['loc'] and how to fix it, in words."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    loc = tuple(err["loc"])
    at = field_at(model, loc) if model else FieldAt(None, None)
    got = shown(value)
    if kind == "extra_forbidden":
        known = field_names(model, loc[:-1]) if model else []
        return "unknown field; remove it" + (f" or use one of: {', '.join(known)}" if known else "")
    if kind == "missing":
        return "required field is missing; add it (see 'trainctl schema')"
    if kind in ("value_error", "assertion_error"):  # our own validators already say what and how
        return err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if loc and loc[-1] == "[key]":
        return f"the key {got} is {kind_of(value)}, not text; write it in quotes"
    if kind in _INTEGER:
        return f"{got} is not a whole number; give an integer{_example(at, int)}"
    if kind in _NUMBER:
        return f"{got} is not a number; give a number{_example(at, int | float)}"
    if kind == "finite_number":
        return f"{got} is not a finite number; give a number{_example(at, int | float)}"
    if kind in _BOOLEAN:
        return f"{got} is not true or false; write true or false"
    if kind == "string_type":
        if value is None:
            return "is empty (null); give a text value, or leave the field out for its default"
        if isinstance(value, list | dict):
            return f"{got} is {kind_of(value)}, not text; give one text value"
        return f"{got} is {kind_of(value)}, not text; write it in quotes: \"{got}\""
    if kind == "string_pattern_mismatch":
        rule = at.info.description if at.info and at.info.description else f"the pattern {ctx.get('pattern')}"
        return f"{got} is not allowed; {rule}"
    if kind == "literal_error" or kind == "enum":
        return f"{got} is not one of {_choices(at, ctx)}; use one of those"
    if kind in _BOUNDS:
        return f"{got} is out of range; it must be {_bounds(at, ctx)}"
    if kind in _MAPPING:
        fields = sorted(at.annotation.model_fields) if _is_model(at.annotation) else []
        form = f"a mapping of its fields ({', '.join(fields)})" if fields else "a mapping {key: value, ...}"
        return f"{got} is {kind_of(value)}, not a mapping; write it as {form}"
    if kind in _LIST:
        return f"{got} is {kind_of(value)}, not a list; write it as [item, ...] or one '- item' per line"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"{got} has too few items; give at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        n = ctx.get("max_length")
        return f"{got} has too many items; give at most {n}"
    return f"{err['msg']} (got {got}); fix the value (see 'trainctl schema')"
