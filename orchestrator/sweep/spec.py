"""The sweep file: a base job, parameters over its fields, a search, an objective, early stopping.

    name: digits-lr
    base: examples/digits/ddp.yaml          # a job file (relative to this file), or a job spec mapping
    overrides: {config.epochs: 4, resources.workers: 1}
    parameters:
      config.lr: {loguniform: [1.0e-4, 1.0e-1]}
      config.hidden: {choice: [128, 512, 2048]}
      data.train.batch_size: {int: [16, 128], step: 16}     # also [16, 128, step 16]
    search: tpe                             # grid | random | tpe
    trials: 24
    max_concurrent: 4
    objective: {metric: accuracy, mode: max}
    early_stopping: {method: asha, unit: epochs, min_resource: 1, reduction_factor: 3}
    post_training: {passes: [{quantize: {method: dynamic_int8}}], checkpoint: best}   # on the best trial
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import SpecError
from ..explain import dotted, problem
from ..spec import _QUEUE, MetricGoal, PostTrainingSpec, apply_overrides, read_yaml

# A trial is the job `<sweep id>-t<N>`: the id adds 7 characters to the name, the trial up to 5.
_SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,43}$"
_FIELD_PATH = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
KINDS = ("choice", "uniform", "float", "loguniform", "int")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Parameter(_Model):
    """One dimension of the search space, normalised from `{kind: [low, high]}` or `{choice: [...]}`."""

    kind: Literal["choice", "uniform", "float", "loguniform", "int"]
    values: list[Any] | None = None  # choice
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "kind" in value:
            return value
        kinds = [k for k in KINDS if k in value]
        extra = sorted(map(str, set(value) - set(KINDS) - {"step", "log"}))
        if len(kinds) != 1 or extra:
            got = ", ".join(extra or kinds) or "nothing"
            raise ValueError(f"a parameter is one of {', '.join(KINDS)} (e.g. {{loguniform: [0.0001, 0.1]}}, "
                             f"{{choice: [128, 512]}}, {{int: [16, 128], step: 16}}) (got {got})")
        kind = kinds[0]
        given = value[kind]
        if not isinstance(given, list) or not given:
            raise ValueError(f"{kind}: give a list, e.g. {kind}: " +
                             ("[128, 512]" if kind == "choice" else "[low, high]"))
        if kind == "choice":
            return {"kind": kind, "values": given}
        bounds, step = list(given), value.get("step")
        if len(bounds) == 3 and isinstance(bounds[2], str) and re.fullmatch(r"step\s+\S+", bounds[2].strip()):
            step = _number(bounds.pop().split()[1], f"{kind}: step")  # `[16, 128, step 16]`
        if len(bounds) != 2:
            raise ValueError(f"{kind}: give [low, high] (got {len(bounds)} values), e.g. {kind}: [16, 128]")
        return {"kind": kind, "low": bounds[0], "high": bounds[1], "step": step,
                "log": value.get("log", kind == "loguniform")}

    @model_validator(mode="after")
    def _consistent(self) -> Parameter:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("choice: give at least one value, e.g. choice: [128, 512]")
            odd = [v for v in self.values if v is not None and not isinstance(v, bool | int | float | str)]
            if odd:  # what Optuna can store and compare
                raise ValueError(f"choice: values are numbers, text, true/false or null (got {odd[0]!r}); "
                                 "search over the fields inside it instead")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.kind}: low ({self.low}) must be less than high ({self.high})")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int: bounds must be whole numbers (got [{self.low:g}, {self.high:g}]); "
                             "use float for fractional values")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"{self.kind}: step must be positive (got {self.step:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.kind}: a log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError(f"{self.kind}: give step or a log scale, not both")
        return self


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None


class EarlyStoppingSpec(_Model):
    method: Literal["asha", "hyperband"] = Field("asha", description="asha: Optuna's SuccessiveHalvingPruner; "
                                                 "hyperband: its HyperbandPruner")
    unit: Literal["steps", "epochs"] = Field("steps", description="what rungs count: the reported step, or "
                                             "epochs completed (the reported 0-based `epoch` + 1)")
    min_resource: int = Field(1, ge=1, description="the first rung, in `unit`s")
    max_resource: int | None = Field(None, ge=1, description="hyperband: a full trial's length in `unit`s "
                                     "(default: learnt from the first trials that finish)")
    reduction_factor: int = Field(3, ge=2, description="keep the best 1/reduction_factor at each rung")


class SweepSpec(_Model):
    name: str = Field(..., pattern=_SWEEP_NAME, description="a sweep name is 1 to 44 letters, digits, '.', '_' "
                      "or '-', starting with a letter or digit (its trials are <sweep id>-t<N>)")
    base: str | dict[str, Any] = Field(..., description="the job every trial starts from: a job file (relative "
                                       "to the sweep file) or an inline job spec")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed changes to the base job, "
                                      "by dotted field path (e.g. config.epochs: 4)")
    parameters: dict[str, Parameter] = Field(..., min_length=1, description="the search space, by dotted "
                                             "job-spec field path (e.g. config.lr: {loguniform: [1e-4, 0.1]})")
    search: Literal["grid", "random", "tpe"] = Field("tpe", description="grid: every combination; random; "
                                                     "tpe: Optuna's Bayesian TPE sampler")
    trials: int | None = Field(None, ge=1, description="how many trials (grid: default every combination)")
    max_concurrent: int = Field(2, ge=1, description="trials queued or running at once")
    seed: int = Field(0, description="the sampler's seed: the same seed samples the same trials")
    objective: MetricGoal = Field(..., description="the metric trials report (ctx.report) and its direction")
    early_stopping: EarlyStoppingSpec | None = Field(None, description="stop bad trials early (ASHA or "
                                                     "Hyperband, from the objective's reports)")
    post_training: PostTrainingSpec | None = Field(
        None, description="once every trial ended: the passes on the best trial's checkpoint (its best with "
        "checkpoint: best, else its last), as one more job, <sweep id>-post (a job's post_training schema)")
    priority: int | None = Field(None, description="the trials' priority (default: the base job's)")
    queue: str | None = Field(None, pattern=_QUEUE, description="the trials' queue (default: the base job's)")

    @model_validator(mode="after")
    def _space(self) -> SweepSpec:
        for path in list(self.parameters) + list(self.overrides):
            if not re.fullmatch(_FIELD_PATH, path):
                raise ValueError(f"{path!r} is not a dotted field path; write e.g. config.lr or data.train.batch_size")
        for path in self.parameters:
            if path in ("name", "priority", "queue"):
                raise ValueError(f"parameters.{path}: the sweep sets a trial's {path}; search over another field")
        if self.search == "grid":
            for path, p in self.parameters.items():
                if p.kind != "choice" and not (p.kind == "int" or p.step is not None):
                    raise ValueError(f"parameters.{path}: a grid needs finite values; use choice, int, "
                                     f"or give {p.kind} a step")
        elif self.trials is None:
            raise ValueError(f"trials: required for search {self.search}; give how many trials to run")
        if self.early_stopping and self.early_stopping.method == "hyperband" and \
                self.early_stopping.max_resource is None:
            raise ValueError("early_stopping.max_resource: hyperband needs the length of a full trial "
                             "(in early_stopping.unit); give max_resource")
        return self


def explain(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = dotted(tuple(err["loc"]))
    return f"{source}: {where + ': ' if where else ''}{problem(err, SweepSpec)}"


def parse_sweep(doc: Any, source: str = "sweep spec", overrides: list[str] | None = None) -> SweepSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: a sweep spec must be a mapping of fields (name, base, parameters, ...)")
    doc = apply_overrides(copy.deepcopy(doc), overrides)
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(explain(exc, source)) from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    return parse_sweep(read_yaml(path, "sweep"), str(path), overrides)
