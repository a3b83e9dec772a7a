"""What every rank runs inside its worker actor: strategy setup, then the user's function."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from strategies import WorkerEnv, get_strategy_class

from .checkpoint import CheckpointStore, load_checkpoint_dir
from .context import TrainContext
from .reporting import Reporter, captured_output
from .spec import JobSpec


@dataclass
class RankTask:
    job_id: str
    spec: dict
    attempt: int
    checkpoint_root: str
    resume_path: str | None  # the committed checkpoint to start from
    supervisor: object  # actor handle


def import_entrypoint(entrypoint: str):
    module_name, _, attr = entrypoint.partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"entrypoint {entrypoint!r} is not callable")
    return fn


def run_rank(task: RankTask) -> dict:
    env = WorkerEnv.from_environ()
    if os.getcwd() not in sys.path:  # the shipped working_dir is the cwd
        sys.path.insert(0, os.getcwd())
    reporter = Reporter(task.supervisor, env.rank)
    try:
        with captured_output(reporter):
            spec = JobSpec.model_validate(task.spec)
            strategy_cls = get_strategy_class(spec.strategy.name)
            strategy = strategy_cls(strategy_cls.parse_options(spec.strategy.options))
            strategy.setup(env)
            store = CheckpointStore(Path(task.checkpoint_root), keep=spec.checkpoint.keep)
            resume = load_checkpoint_dir(task.resume_path) if task.resume_path else None
            ctx = TrainContext(
                env, strategy, job_id=task.job_id, config=spec.config, reporter=reporter,
                checkpoints=store, resume_from=resume,
                every_n_steps=spec.checkpoint.every_n_steps, attempt=task.attempt, data=spec.data,
            )
            import_entrypoint(spec.entrypoint)(ctx)
            strategy.teardown()
            return {"rank": env.rank, "step": ctx.step}
    finally:
        reporter.close()
