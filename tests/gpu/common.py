"""Helpers of the GPU smoke suite: is there a GPU, job specs, results."""

from __future__ import annotations

import json
from pathlib import Path

from ..helpers import REPO


def cuda_missing() -> str | None:
    """Why this process cannot use a GPU (None: it can)."""
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        return f"torch does not import: {exc}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if cuda_missing() is None else 0


def gpu_job(name: str, tmp_path: Path, data: str, *, workers: int = 1, strategy: str = "ddp",
            options: dict | None = None, config: dict | None = None, **overrides) -> dict:
    """A spec for tests.gpu.jobs:train_gpt on `workers` GPUs (one each)."""
    spec = {
        "name": name, "entrypoint": "tests.gpu.jobs:train_gpt", "working_dir": str(REPO),
        "config": {"out": str(tmp_path / "out"), **(config or {})},
        "resources": {"workers": workers, "cpus_per_worker": 1, "gpus_per_worker": 1, "placement": "pack"},
        "strategy": {"name": strategy, "options": options or {}},
        "data": {"train": {"path": data, "batch_size": 16, "shuffle": True, "seed": 0}},
        "checkpoint": {"storage": str(tmp_path / "runs"), "keep": 1},
        "failure": {"max_restarts": 0},
    }
    spec.update(overrides)
    return spec


def rank_results(tmp_path: Path, workers: int = 1) -> list[dict]:
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(workers)]


def finished(client, job_id: str, timeout_s: float = 240) -> dict:
    """The job's final record; on failure the assertion carries its error and log tail."""
    job = client.wait(job_id, timeout_s=timeout_s)
    if job["state"] != "SUCCEEDED":
        logs, _ = client.read_logs(job_id)
        raise AssertionError(f"{job['state']}: {job.get('error')}\n--- log tail ---\n{logs[-4000:]}")
    return job
