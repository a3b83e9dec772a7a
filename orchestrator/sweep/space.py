"""The search space: sweep parameters as Optuna distributions, and a trial's values put into
the base job spec (by dotted field path, with the job spec's own one-line errors)."""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..spec import JobSpec, _set_path, parse_spec
from .spec import Parameter, SweepSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def distribution(p: Parameter) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.kind == "choice":
        return CategoricalDistribution(p.values)
    if p.kind == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(p.low, p.high, log=p.log, step=p.step)


def distributions(sweep: SweepSpec) -> dict[str, BaseDistribution]:
    return {path: distribution(p) for path, p in sweep.parameters.items()}


def grid_values(p: Parameter) -> list[Any]:
    """Every value a grid tries (choice values; int or stepped float from low to high)."""
    if p.kind == "choice":
        return list(p.values)
    if p.kind == "int":
        return list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
    count = int(round((p.high - p.low) / p.step)) + 1
    return [round(p.low + i * p.step, 12) for i in range(count) if p.low + i * p.step <= p.high + 1e-12]


def grid(sweep: SweepSpec) -> dict[str, list[Any]]:
    return {path: grid_values(p) for path, p in sweep.parameters.items()}


def grid_size(sweep: SweepSpec) -> int:
    size = 1
    for values in grid(sweep).values():
        size *= len(values)
    return size


def trial_count(sweep: SweepSpec) -> int:
    """How many trials the sweep runs: `trials`, and a grid never more than its combinations."""
    if sweep.search == "grid":
        return min(sweep.trials or grid_size(sweep), grid_size(sweep))
    return sweep.trials


def base_doc(base: JobSpec, sweep: SweepSpec) -> dict:
    """The base job with the sweep's fixed overrides, priority and queue (as a spec mapping)."""
    doc = base.model_dump(mode="json")
    for path, value in _leaves(sweep.overrides):
        _set_path(doc, path, copy.deepcopy(value), f"overrides.{path}")
    if sweep.priority is not None:
        doc["priority"] = sweep.priority
    if sweep.queue is not None:
        doc["queue"] = sweep.queue
    return doc


def _leaves(tree: dict, prefix: str = ""):
    """(dotted path, value) of a mapping's leaves: `{data: {train: {path: x}}}` (as `--set
    overrides.data.train.path=x` writes it) changes that one field, not the whole `data`."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def trial_doc(base: dict, params: dict[str, Any], name: str, source: str = "sweep") -> dict:
    """The job spec of one trial: the base with `params` set; a value the job spec rejects is
    a SpecError naming the parameter."""
    doc = copy.deepcopy(base)
    doc["name"] = name
    for path, value in params.items():
        _set_path(doc, path, value, f"{source}: parameters.{path}")
    try:
        return parse_spec(doc, source).model_dump(mode="json")
    except SpecError as exc:
        raise SpecError(_blame_parameter(str(exc), params, source)) from None


def _blame_parameter(message: str, params: dict[str, Any], source: str) -> str:
    """`sweep.yaml: config.hidden: ...` -> `sweep.yaml: parameters.config.hidden = 0: ...`."""
    where = message.removeprefix(f"{source}: ")
    for path, value in params.items():
        if where.startswith(path + ":") or where.startswith(path + "."):
            return f"{source}: parameters.{path} = {value!r}: {where[len(path) + 1:].lstrip(': ')}"
    return message


def check_space(sweep: SweepSpec, base: dict, source: str) -> None:
    """Every parameter's extreme values (each choice, low and high) make a valid job spec, so a
    bad space fails at submit, not as failed trials."""
    probes = {path: (list(p.values) if p.kind == "choice" else
                     [int(p.low), int(p.high)] if p.kind == "int" else [p.low, p.high])
              for path, p in sweep.parameters.items()}
    firsts = {path: values[0] for path, values in probes.items()}
    for path, values in probes.items():
        for value in values:
            trial_doc(base, {**firsts, path: value}, f"{sweep.name}-check", source)
    if sweep.search == "grid" and grid_size(sweep) <= 64:
        for combo in itertools.product(*grid(sweep).values()):
            trial_doc(base, dict(zip(sweep.parameters, combo, strict=True)), f"{sweep.name}-check", source)
