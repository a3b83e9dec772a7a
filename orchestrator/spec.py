"""The job spec: YAML <-> pydantic models, `--set` overrides, validation, JSON Schema."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError
from .explain import dotted, problem, shown

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_ENTRYPOINT = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
_QUEUE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"


class _Model(BaseModel):
    # no inf/nan: `.inf` CPUs or a `.nan` timeout would pass the bounds and fail much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Resources(_Model):
    workers: int = Field(1, ge=1, description="number of ranks (one worker actor each)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker; also OMP_NUM_THREADS")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs reserved per worker")
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = Field(
        "pack", description="how the gang is spread over nodes (Ray placement group strategy)"
    )
    colocate: int = Field(1, ge=1, description="workers reserved together on one node, in groups of this "
                          "size with contiguous ranks (a tensor-parallel group; raised by the strategy)")
    min_workers: int | None = Field(
        None, ge=1, description="elastic: start once this many workers fit, grow back towards `workers` "
        "when room frees, shrink instead of waiting on a node loss (default: workers, a fixed size)")

    @model_validator(mode="after")
    def _min_within_workers(self) -> Resources:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) is more than workers ({self.workers}); "
                             "set min_workers to at most workers")
        return self


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


class MetricGoal(_Model):
    metric: str = Field(..., description="a key the job passes to ctx.report (e.g. accuracy, loss)")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better")


class EarlyStopSpec(MetricGoal):
    patience: int = Field(3, ge=1, description="reports of the metric without improvement before the job stops")
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")


class CheckpointSpec(_Model):
    storage: str = Field("runs", description="directory (shared by all nodes) for checkpoints")
    every_n_steps: int | None = Field(
        None, ge=1, description="save a checkpoint given to ctx.report only this often (None: every time)"
    )
    keep: int = Field(3, ge=1, description="committed checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None, description="a committed checkpoint directory (any job, any strategy or world size) to start from"
    )
    keep_best: MetricGoal | None = Field(
        None, description="also keep the checkpoint with the best value of this metric (besides the newest `keep`)")


class FailureSpec(_Model):
    max_restarts: int = Field(3, ge=0, description="restarts from the last checkpoint before the job fails")
    restart_timeout_s: float = Field(
        300, gt=0, description="how long a restart waits for capacity after a node loss"
    )
    unschedulable: Literal["queue", "fail"] = Field(
        "queue", description="a job larger than the whole cluster: stay queued, or fail at once"
    )
    hang_timeout_s: float | None = Field(
        None, gt=0, description="a rank that makes no progress (no ctx.report, no batch) this long is "
        "hung: stacks are dumped and the job restarts; default: learnt from the job's own cadence "
        "(5x its longest gap, 60 s to 300 s), never before a rank's first report"
    )


class PreemptionSpec(_Model):
    grace_s: float = Field(120, gt=0, description="how long a preempted job may take to save its just-in-time "
                           "checkpoint before its ranks are stopped anyway")
    min_runtime_s: float = Field(60, ge=0, description="a job is preempted at most once per this many seconds "
                                 "of running")


class MlflowSpec(_Model):
    uri: str = Field(..., description="MLflow tracking URI, e.g. http://127.0.0.1:5000")
    experiment: str = Field("trainctl", description="experiment the job's run is logged under")
    parent_run_id: str | None = Field(None, description="nest the job's run under this run (a sweep's run)")


class TrackingSpec(_Model):
    tensorboard: bool = Field(False, description="write TensorBoard event files under the job's directory")
    mlflow: MlflowSpec | None = Field(None, description="log a run per job to this MLflow tracking server")


# ---- post-training passes (orchestrator/compress) -------------------------------------

class FinetuneSpec(_Model):
    steps: int = Field(100, ge=1, description="optimizer steps on the train split after pruning")
    lr: float = Field(1e-3, gt=0, description="learning rate (AdamW)")
    split: str = Field("train", description="data split to fine-tune on")


class PruneSpec(_Model):
    method: Literal["l1_unstructured", "l1_structured"] = Field(
        ..., description="l1_unstructured: global L1 magnitude, made permanent; "
        "l1_structured: channels/neurons removed (torch-pruning)")
    amount: float = Field(..., gt=0, lt=1, description="fraction of weights (or channels) removed")
    ignore: list[str] = Field(default_factory=list, description="module names never pruned "
                              "(the output layer and the hooks' prune_ignore are always kept)")
    round_to: int | None = Field(None, ge=1, description="l1_structured: keep channel counts a multiple of this "
                                 "(e.g. 32 for a weight_only_int4 group size, 8/16 for SIMD-friendly widths)")
    finetune: FinetuneSpec | None = Field(None, description="short fine-tune on the train split after pruning")


class QuantizeSpec(_Model):
    method: Literal["dynamic_int8", "static_int8", "weight_only_int8", "weight_only_int4"] = Field(
        ..., description="dynamic_int8 (torch.ao), static_int8 (PT2E, x86 inductor, calibrated), "
        "weight_only_int8/int4 (torchao)")
    calibration_batches: int = Field(8, ge=1, description="static_int8: train batches to calibrate on")
    group_size: int = Field(32, ge=1, description="weight_only_int4: weights per scale group")
    compile: bool = Field(True, description="static_int8: measure under torch.compile (inductor), "
                          "which is what runs its int8 kernels")


class PassSpec(_Model):
    prune: PruneSpec | None = None
    quantize: QuantizeSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(map(str, set(value) - {"prune", "quantize"}))
            given = [k for k in ("prune", "quantize") if value.get(k) is not None]  # a dump has both, one None
            if unknown or len(given) != 1:
                got = ", ".join(unknown or given) or "nothing"
                raise ValueError(f"a pass is one of prune or quantize, e.g. {{prune: {{method: l1_unstructured, "
                                 f"amount: 0.5}}}} (got {got})")
        return value

    @property
    def kind(self) -> str:
        return "prune" if self.prune is not None else "quantize"

    @property
    def options(self) -> PruneSpec | QuantizeSpec:
        return self.prune if self.prune is not None else self.quantize

    @property
    def label(self) -> str:
        o = self.options
        return f"{o.method}({o.amount:g})" if self.prune is not None else o.method


class GateSpec(_Model):
    metric: str | None = Field(None, description="key of the evaluate hook's result the gate watches")
    max_drop: float = Field(0.01, ge=0, description="largest allowed drop of the metric vs the trained model")
    higher_is_better: bool = Field(True, description="false for a loss-like metric")
    min_size_gain: float = Field(0.05, ge=0, lt=1, description="'smaller' means at least this fraction smaller")
    min_speedup: float = Field(1.05, ge=1, description="'faster' means p50 at batch 1 at least this much faster")


class EvalSpec(_Model):
    split: str = Field("eval", description="data split the metric is computed on")
    max_batches: int | None = Field(None, ge=1, description="evaluate on at most this many batches")
    threads: int | None = Field(None, ge=1, description="torch threads for measuring (default: cpus_per_worker)")
    latency_iters: int = Field(200, ge=10, description="timed forward passes at batch 1")
    throughput_batch: int = Field(64, ge=1, description="batch size for the throughput measurement")


class PostTrainingSpec(_Model):
    passes: list[PassSpec] = Field(..., min_length=1, description="run in order; each sees the last kept model")
    gate: GateSpec = Field(default_factory=GateSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    hooks: str | None = Field(None, description="module with build_model(config), evaluate(model, batches), "
                              "model_inputs(batch), loss(model, batch) (default: the entrypoint's module)")
    model_key: str = Field("model", description="key of the model in the checkpoint given to ctx.report")
    output: str | None = Field(None, description="report and model directory (default: <job dir>/post_training)")
    checkpoint: Literal["last", "best"] = Field(
        "last", description="the checkpoint the passes start from: the newest, or checkpoint.keep_best's best")

    @model_validator(mode="after")
    def _quantize_last(self) -> PostTrainingSpec:
        kinds = [p.kind for p in self.passes]
        if kinds.count("quantize") > 1 or ("quantize" in kinds and kinds[-1] != "quantize"):
            raise ValueError("a model is quantized once: use at most one quantize pass, as the last pass")
        return self


class JobSpec(_Model):
    name: str = Field(..., pattern=_NAME, description="a job name is 1 to 63 letters, digits, '.', '_' or "
                      "'-', starting with a letter or digit (e.g. digits-ddp)")
    entrypoint: str | None = Field(None, description="module:function(ctx) run on every rank")
    command: list[str] | None = Field(
        None, min_length=1, description="instead of entrypoint: a torchrun-style script run on every rank with "
        "torchrun's environment, e.g. [python, train.py, --lr, '0.1']")
    working_dir: str = Field(".", description="directory shipped to every worker and put on sys.path")
    config: dict[str, Any] = Field(default_factory=dict, description="free-form, given as ctx.config")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for workers")
    resources: Resources = Field(default_factory=Resources)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    data: dict[str, DataSpec] = Field(default_factory=dict, description="named splits, e.g. train, eval")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    priority: int = Field(0, description="higher runs first; equal priorities run oldest first")
    queue: str = Field("default", pattern=_QUEUE, description="the queue whose quota the job runs in "
                       "(trainctl queue create)")
    preemptible: bool = Field(True, description="may a higher-priority job preempt this one")
    preemption: PreemptionSpec = Field(default_factory=PreemptionSpec)
    early_stop: EarlyStopSpec | None = Field(
        None, description="end the job (SUCCEEDED) when the metric stops improving")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    post_training: PostTrainingSpec | None = Field(
        None, description="pruning/quantization passes run on the final checkpoint (state POST_TRAINING)")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_ENTRYPOINT, value):
            raise ValueError("expected 'module.path:function', e.g. examples.digits.train:train")
        return value

    @model_validator(mode="after")
    def _entrypoint_or_command(self) -> JobSpec:
        if self.entrypoint is None and self.command is None:
            raise ValueError("entrypoint: required field is missing; give entrypoint (module:function) "
                             "or command (a script's argv, e.g. [python, train.py])")
        if self.entrypoint is not None and self.command is not None:
            raise ValueError("entrypoint and command: give one of them, not both")
        return self

    @model_validator(mode="after")
    def _post_training_splits(self) -> JobSpec:
        post = self.post_training
        if post is None:
            return self
        if post.checkpoint == "best" and self.checkpoint.keep_best is None:
            raise ValueError("post_training.checkpoint: best needs checkpoint.keep_best (which metric makes a "
                             "checkpoint the best), e.g. checkpoint: {keep_best: {metric: accuracy, mode: max}}")
        if post.gate.metric and post.eval.split not in self.data:
            raise ValueError(f"post_training.gate.metric needs the eval split {post.eval.split!r}, but data has "
                             f"{', '.join(self.data) or 'no splits'}; add data.{post.eval.split} or set post_training.eval.split")
        for i, p in enumerate(post.passes):
            o = p.options
            split = (o.finetune.split if p.prune is not None and o.finetune else
                     "train" if p.quantize is not None and o.method == "static_int8" else None)
            if split and split not in self.data:
                raise ValueError(f"post_training.passes.{i}: {p.label} needs the data split {split!r} "
                                 f"(calibration/fine-tuning); add data.{split}")
        return self

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        env = {str(k): str(v) for k, v in value.items()}
        for key, text in env.items():  # else every worker fails to start, after the gang is reserved
            if not key or "=" in key or "\0" in key + text:
                raise ValueError(f"{key!r}: {shown(text)} cannot be an environment variable (a name needs at "
                                 "least one character and no '='; no NUL bytes anywhere); rename or remove it")
        return env

    # ---- YAML ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> JobSpec:
        return load_spec(path, overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading and errors -------------------------------------------------------------

def explain(exc: ValidationError, source: str, overridden: list[str] | None = None) -> str:
    """One line: where, what, how to fix -- for the first problem pydantic found. A value that
    came from `--set` is blamed on --set, not on the file."""
    err = exc.errors()[0]
    where = dotted(tuple(err["loc"]))
    if any(where == key or where.startswith(key + ".") for key in overridden or []):
        return f"--set {where}: {problem(err, JobSpec)}"
    return f"{source}: {where + ': ' if where else ''}{problem(err, JobSpec)}"


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
        raise SpecError(explain(exc, source, [item.partition("=")[0] for item in overrides or []])) from None


def read_yaml(path: str | Path, what: str = "job") -> Any:
    """The document in a YAML file; a missing file or a syntax error is one SpecError line."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such {what} file; pass the path of a {what} YAML")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                        f"is not UTF-8); pass the path of a {what} YAML") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what} file ({exc.strerror}); check its permissions") from None
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # UTF-8, but control characters: a binary file
        raise SpecError(f"{path}: character U+{exc.character:04X} at offset {exc.position} is not allowed in YAML "
                        f"(a binary file?); pass the path of a {what} YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: {where}: {problem}; fix the YAML syntax") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    return parse_spec(read_yaml(path), str(path), overrides)


def json_schema() -> dict:
    return JobSpec.model_json_schema()
