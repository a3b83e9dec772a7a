"""The Python API behind the CLI: validate, package, submit, watch, cancel."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

import ray

from cluster import inventory, packaging
from cluster.connect import connect
from strategies import Layout, Strategy, StrategyConfigError, get_strategy_class

from ..control.controller import get_or_create_controller
from ..control.states import JobState
from ..errors import SpecError, UserError
from ..importing import importable_from
from ..spec import JobSpec, load_spec, parse_spec
from .command_job import script_of


def _is_uri(path: str) -> bool:
    return "://" in path


def _entry_module(spec: JobSpec, working_dir: Path):
    with importable_from(str(working_dir)):
        return importlib.import_module(spec.entrypoint.partition(":")[0])


def _check_entrypoint(spec: JobSpec, working_dir: Path) -> None:
    module_name, _, attr = spec.entrypoint.partition(":")
    try:
        module = _entry_module(spec, working_dir)
    except Exception as exc:
        raise SpecError(
            f"entrypoint: cannot import {module_name!r} from working_dir {working_dir}: "
            f"{type(exc).__name__}: {exc}; check the module path and working_dir"
        ) from None
    if not callable(getattr(module, attr, None)):
        raise SpecError(f"entrypoint: module {module_name!r} has no function {attr!r}; "
                        "name a function that takes ctx")


def _check_command(spec: JobSpec, working_dir: Path) -> None:
    """A script job: the script is there; the parts of a spec that only an entrypoint uses are not."""
    script = script_of(spec.command)
    if script is not None and "$" not in script and not (working_dir / script).is_file():
        raise SpecError(f"command: {script} is not a file in working_dir {working_dir}; give the script's path "
                        "relative to working_dir (or set working_dir to the script's directory)")
    if spec.strategy.name != "ddp" or spec.strategy.options:
        raise SpecError("strategy: a command job sets up its own distributed training (init_process_group); "
                        "remove strategy, or use entrypoint: module:function to use a trainctl strategy")
    if spec.data:
        raise SpecError("data: a command job reads its own data (ctx.dataset is for entrypoint jobs); remove data")
    if spec.post_training is not None:
        raise SpecError("post_training: a command job's checkpoints are its own files, which the passes cannot "
                        "read; remove post_training, or use entrypoint: module:function")


def _check_dataset(name: str, split) -> None:
    """The manifest reads and the asked-for columns exist (shards are checked as they are read)."""
    from ..data.fs import read_manifest
    from ..data.fs import resolve as resolve_data
    from ..data.manifest import DatasetError
    from ..data.reader import ShardReader

    try:
        fs, base = resolve_data(split.path)
        manifest = read_manifest(fs, base)
        if manifest.num_rows == 0:
            raise DatasetError(f"{split.path}: the dataset is empty; re-create it from non-empty sources")
        ShardReader(fs, base, manifest, split.columns, where=split.path)
    except DatasetError as exc:
        raise SpecError(f"data.{name}: {exc}") from None


def _check_strategy(spec: JobSpec, working_dir: Path) -> None:
    """Options and layout; the model itself where the entrypoint's module can build it; and
    the node groups the strategy needs (`resources.colocate`)."""
    r = spec.resources
    layout = Layout(r.workers, r.gpus_per_worker, r.cpus_per_worker)
    try:
        cls = get_strategy_class(spec.strategy.name)
        options = cls.parse_options(spec.strategy.options)
        cls.validate(layout, options)
        build_model = getattr(_entry_module(spec, working_dir), "build_model", None) if spec.entrypoint else None
        if callable(build_model) and cls.check_model.__func__ is not Strategy.check_model.__func__:
            import torch

            with torch.device("meta"):  # shapes and names only: no memory, no init time
                model = build_model(spec.config)
            cls.check_model(model, layout, options)
    except StrategyConfigError as exc:
        raise SpecError(_strategy_problem(exc, spec.strategy.name)) from None
    group = cls.colocated_group(layout, options)
    if group > 1:
        if r.colocate % group and group % r.colocate:
            raise SpecError(f"resources.colocate: {r.colocate} does not fit the strategy's groups of "
                            f"{group} ranks on one node; set it to {group}")
        spec.resources.colocate = max(group, r.colocate)
    if r.workers % r.colocate:
        raise SpecError(f"resources.colocate: {r.workers} workers do not split into groups of "
                        f"{r.colocate}; make resources.workers a multiple of {r.colocate}")


def _strategy_problem(exc: StrategyConfigError, strategy: str) -> str:
    """A wrongly typed option in the same words as a spec field; other problems as the strategy says."""
    from pydantic import ValidationError

    from ..explain import dotted, problem

    cause = exc.__context__  # parse_options raises `from None`: pydantic's error is still here
    if isinstance(cause, ValidationError):
        err = cause.errors()[0]
        return f"strategy.options.{dotted(tuple(err['loc']))} (of strategy {strategy!r}): {problem(err)}"
    return f"strategy: {exc}"


def resolve(spec: JobSpec, base_dir: Path | None = None) -> JobSpec:
    """Checks that need no cluster, and paths made absolute (workers run elsewhere)."""
    base = Path(base_dir or Path.cwd())
    spec = spec.model_copy(deep=True)
    working_dir = (base / spec.working_dir).resolve()
    if not working_dir.is_dir():
        raise SpecError(f"working_dir: {working_dir} is not a directory; point it at your code")
    spec.working_dir = str(working_dir)
    if not _is_uri(spec.checkpoint.storage):
        spec.checkpoint.storage = str((base / spec.checkpoint.storage).resolve())
    if spec.checkpoint.resume_from:
        resume = (base / spec.checkpoint.resume_from).resolve()
        if not (resume / "manifest.json").is_file():
            raise SpecError(f"checkpoint.resume_from: {resume} is not a committed checkpoint "
                            "(no manifest.json); give a checkpoint_N directory")
        spec.checkpoint.resume_from = str(resume)
    for name, split in spec.data.items():
        if not _is_uri(split.path):
            split.path = str((base / split.path).resolve())
        _check_dataset(name, split)
    if spec.command is not None:
        _check_command(spec, working_dir)
    else:
        _check_entrypoint(spec, working_dir)
    _check_strategy(spec, working_dir)
    _check_post_training(spec, working_dir, base)
    return spec


def _check_post_training(spec: JobSpec, working_dir: Path, base: Path) -> None:
    """The passes can run on this platform and the hooks module has what they need."""
    if spec.post_training is None:
        return
    if spec.post_training.output and not _is_uri(spec.post_training.output):
        spec.post_training.output = str((base / spec.post_training.output).resolve())
    from ..compress.checks import check_post_training

    check_post_training(spec, str(working_dir))


def check_against_cluster(spec: JobSpec) -> None:
    gpus = spec.resources.gpus_per_worker
    if gpus and max((n.gpus for n in inventory.nodes()), default=0) < gpus:
        raise SpecError(
            f"resources.gpus_per_worker: {gpus:g} GPU per worker requested but no node of this "
            "cluster has that many GPUs; set it to 0 or add GPU nodes"
        )


def as_spec(spec: JobSpec | dict | str | Path, overrides: list[str] | None = None) -> JobSpec:
    if isinstance(spec, JobSpec):
        return parse_spec(spec.model_dump(mode="json"), "job spec", overrides) if overrides else spec
    if isinstance(spec, dict):
        return parse_spec(spec, "job spec", overrides)
    return load_spec(spec, overrides)


class Client:
    """A connection to one cluster's controller."""

    def __init__(self, address: str | None = None, *, embedded: bool = False):
        self.mode = connect(address, allow_embedded=embedded)
        self.controller = get_or_create_controller()
        self.info = self._call("ping")

    def _call(self, method: str, *args):
        """Call the controller; if it was killed, the next one (recreated from its table) answers."""
        try:
            try:
                return ray.get(getattr(self.controller, method).remote(*args))
            except ray.exceptions.RayActorError:
                self.controller = get_or_create_controller()
                return ray.get(getattr(self.controller, method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None  # e.g. an unknown job id: one line, not a remote traceback
            raise

    def submit(self, spec: JobSpec | dict | str | Path, *, priority: int | None = None,
               overrides: list[str] | None = None, base_dir: Path | None = None) -> str:
        resolved = resolve(as_spec(spec, overrides), base_dir)
        check_against_cluster(resolved)
        package = packaging.package_working_dir(resolved.working_dir)
        job = self._call("submit", resolved.model_dump(mode="json"), package, priority)
        return job["id"]

    def get(self, job_id: str) -> dict:
        return self._call("get_job", job_id)

    def list(self, states: list[str] | None = None, ended_since: float | None = None,
             limit: int | None = None) -> list[dict]:
        """Job summaries, oldest first (see Controller.list_jobs); `get` has the whole record."""
        return self._call("list_jobs", states, ended_since, limit)

    def cancel(self, job_id: str) -> dict:
        return self._call("cancel", job_id)

    def drain(self, node: str) -> dict:
        """`trainctl cluster drain NODE` (Controller.drain_node)."""
        return self._call("drain_node", node)

    def read_logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        return self._call("read_logs", job_id, offset)

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None,
             poll_s: float = 0.5, timeout_s: float | None = None) -> dict:
        """Poll until the job ends; returns its final record."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if JobState(job["state"]).terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s}s")
            time.sleep(poll_s)


def submit(spec, address: str | None = None, priority: int | None = None) -> str:
    """Queue a job on a running cluster; returns its id at once."""
    return Client(address).submit(spec, priority=priority)


def run(spec, address: str | None = None) -> dict:
    """Submit and wait; uses an embedded Ray when no cluster is configured."""
    client = Client(address, embedded=True)
    return client.wait(client.submit(spec))
