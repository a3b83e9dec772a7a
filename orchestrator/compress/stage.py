"""The job stage POST_TRAINING: runs inside a worker actor of the job (the job's working_dir
runtime env, its placement group), after every rank finished training."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_output(checkpoint_root: str | Path) -> Path:
    return Path(checkpoint_root) / "post_training"


def run_stage(spec_doc: dict, checkpoint: str, output: str, job_id: str, threads: int) -> dict:
    """Called through the worker actor; returns the pipeline's summary plus its log lines."""
    from ..spec import JobSpec
    from .pipeline import run_pipeline

    if os.getcwd() not in sys.path:  # the shipped working_dir is the cwd
        sys.path.insert(0, os.getcwd())
    spec = JobSpec.model_validate(spec_doc)
    spec.working_dir = os.getcwd()
    lines: list[str] = []
    summary = run_pipeline(spec, checkpoint, output, threads=threads, job_id=job_id, log=lines.append)
    return {**summary, "log": lines}
