"""What every rank runs in its rank process (a fork of its node's zygote, runtime/zygote.py, or
on the classic path a worker actor): strategy setup, then the user's function (or, for a
`command:` job, the user's script as a child process: runtime/script.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from strategies import WorkerEnv, get_strategy_class
from strategies.refs import load_ref

from ..spec import JobSpec
from .checkpoint import CheckpointStore, load_checkpoint_dir
from .context import TrainContext
from .preemption import Preempted
from .reporting import Reporter, captured_output


@dataclass
class RankTask:
    job_id: str
    spec: dict
    attempt: int
    checkpoint_root: str
    resume_path: str | None  # the committed checkpoint to start from
    supervisor: object  # where reports go: the SupervisorRef, or (a forked rank) its host relay
    owner: str | None = None  # this attempt's claim on the checkpoint directory (CheckpointStore.claim)


def import_entrypoint(entrypoint: str):
    fn = load_ref(entrypoint)
    if not callable(fn):
        raise TypeError(f"entrypoint {entrypoint!r} is not callable")
    return fn


# What Ray Train sets for NCCL (ray/train/torch/config.py): a collective that times out or
# fails raises in the rank instead of hanging it; the user's spec.env may override it.
NCCL_ENV_DEFAULTS = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def apply_nccl_env_defaults(environ=os.environ) -> None:
    # TORCH_NCCL_BLOCKING_WAIT is the user's other choice of failure handling: respect it too
    if "TORCH_NCCL_BLOCKING_WAIT" in environ:
        return
    for name, value in NCCL_ENV_DEFAULTS.items():
        environ.setdefault(name, value)


def run_rank(task: RankTask) -> dict:
    env = WorkerEnv.from_environ()
    if os.getcwd() not in sys.path:  # the shipped working_dir is the cwd
        sys.path.insert(0, os.getcwd())
    apply_nccl_env_defaults()
    reporter = Reporter(task.supervisor, env.rank)
    try:
        with captured_output(reporter, task.job_id, env.rank, task.attempt) as capture:
            spec = JobSpec.model_validate(task.spec)
            if spec.command is not None:  # a torchrun-style script: it sets up its own process group
                from .script import run_script

                return run_script(task, spec, reporter, capture.path)
            strategy_cls = get_strategy_class(spec.strategy.name)
            strategy = strategy_cls(strategy_cls.parse_options(spec.strategy.options))
            strategy.setup(env)
            store = CheckpointStore(Path(task.checkpoint_root), keep=spec.checkpoint.keep, owner=task.owner,
                                    keep_best=spec.checkpoint.keep_best)
            resume = load_checkpoint_dir(task.resume_path) if task.resume_path else None
            ctx = TrainContext(
                env, strategy, job_id=task.job_id, config=spec.config, reporter=reporter,
                checkpoints=store, resume_from=resume,
                every_n_steps=spec.checkpoint.every_n_steps, attempt=task.attempt, data=spec.data,
            )
            try:
                import_entrypoint(spec.entrypoint)(ctx)
            except Preempted:  # its just-in-time checkpoint is committed: the rank stops, no failure
                strategy.teardown()
                return {"rank": env.rank, "step": ctx.step, "preempted": True}
            strategy.teardown()
            return {"rank": env.rank, "step": ctx.step}
    finally:
        reporter.close()
