"""The job spec: YAML <-> pydantic models, `--set` overrides, validation, JSON Schema."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_ENTRYPOINT = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Model):
    workers: int = Field(1, ge=1, description="number of ranks (one worker actor each)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker; also OMP_NUM_THREADS")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs reserved per worker")
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = Field(
        "pack", description="how the gang is spread over nodes (Ray placement group strategy)"
    )


class StrategySpec(_Model):
    name: str = Field("ddp", description="a registered name, an entry point, or pkg.module:Class")
    options: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Model):
    path: str = Field(..., description="dataset directory or URI made by 'trainctl data shard'")
    batch_size: int = Field(32, ge=1, description="samples per batch on each rank")
    shuffle: bool = Field(False, description="shuffle shard blocks, then samples within a window")
    seed: int = Field(0, description="with the epoch, fixes the order (the same at any world size)")
    prefetch: int = Field(4, ge=0, description="batches read ahead in a background thread (0: read inline)")
    num_threads: int = Field(1, ge=1, description="background reader threads")
    columns: list[str] | None = Field(None, description="columns to read (default: all)")
    drop_last: bool = Field(True, description="drop each rank's last partial batch")
    remainder: Literal["drop", "pad"] = Field(
        "drop", description="samples that do not divide over the ranks: drop them, or pad by wrapping"
    )
    ragged: Literal["pad", "pack"] = Field("pad", description="variable-length lists: pad, or pack flat")
    shuffle_window: int = Field(16384, ge=1, description="samples shuffled together in memory")
    verify_checksums: bool = Field(False, description="check each shard's sha256 when first read")


class CheckpointSpec(_Model):
    storage: str = Field("runs", description="directory (shared by all nodes) for checkpoints")
    every_n_steps: int | None = Field(
        None, ge=1, description="save a checkpoint given to ctx.report only this often (None: every time)"
    )
    keep: int = Field(3, ge=1, description="committed checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None, description="a committed checkpoint directory (any job, any strategy or world size) to start from"
    )


class FailureSpec(_Model):
    max_restarts: int = Field(3, ge=0, description="restarts from the last checkpoint before the job fails")
    restart_timeout_s: float = Field(
        300, gt=0, description="how long a restart waits for capacity after a node loss"
    )
    unschedulable: Literal["queue", "fail"] = Field(
        "queue", description="a job larger than the whole cluster: stay queued, or fail at once"
    )


class JobSpec(_Model):
    name: str = Field(..., pattern=_NAME, description="job name (letters, digits, . _ -)")
    entrypoint: str = Field(..., description="module:function(ctx) run on every rank")
    working_dir: str = Field(".", description="directory shipped to every worker and put on sys.path")
    config: dict[str, Any] = Field(default_factory=dict, description="free-form, given as ctx.config")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for workers")
    resources: Resources = Field(default_factory=Resources)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    data: dict[str, DataSpec] = Field(default_factory=dict, description="named splits, e.g. train, eval")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    priority: int = Field(0, description="higher runs first; equal priorities run oldest first")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_form(cls, value: str) -> str:
        if not re.fullmatch(_ENTRYPOINT, value):
            raise ValueError("expected 'module.path:function', e.g. examples.digits.train:train")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value

    # ---- YAML ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> JobSpec:
        return load_spec(path, overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading and errors -------------------------------------------------------------

def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed at `loc` (for 'unknown field' hints)."""
    for part in loc:
        info = model.model_fields.get(str(part))
        sub = getattr(info, "annotation", None) if info else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            model = sub
        else:
            return []
    return sorted(model.model_fields)


def explain(exc: ValidationError, source: str) -> str:
    """One line: where, what, how to fix -- for the first problem pydantic found."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _field_names(JobSpec, loc[:-1])
        return f"{source}: {where}: unknown field; remove it or use one of: {', '.join(known)}"
    if kind == "missing":
        return f"{source}: {where}: required field is missing; add it (see 'trainctl schema')"
    got = err.get("input")
    return f"{source}: {where}: {err['msg']} (got {got!r}); fix the value (see 'trainctl schema')"


def _set_path(doc: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{source}: --set {dotted}: {part!r} is not a mapping; set a field inside a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(doc: dict, overrides: list[str] | None) -> dict:
    """`--set a.b=c`: the value is read as YAML, so numbers, booleans and lists keep their type."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. --set resources.workers=4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(doc, key, value, "--set")
    return doc


def parse_spec(doc: Any, source: str = "job spec", overrides: list[str] | None = None) -> JobSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: a job spec must be a mapping of fields (name, entrypoint, ...)")
    doc = apply_overrides(copy.deepcopy(doc), overrides)  # never edit the caller's dict
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(explain(exc, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job file; pass the path of a job YAML")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: {where}: {problem}; fix the YAML syntax") from None
    return parse_spec(doc, str(path), overrides)


def json_schema() -> dict:
    return JobSpec.model_json_schema()
