"""Test helpers: wait on a condition (never sleep-and-hope), build specs, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINCTL = [sys.executable, "-m", "orchestrator"]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail loudly on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine (a simulated node's rank) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def job_spec(name: str, entrypoint: str, tmp_path: Path, **overrides) -> dict:
    spec = {
        "name": name,
        "entrypoint": entrypoint,
        "working_dir": str(REPO),
        "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"},
        "checkpoint": {"storage": str(tmp_path / "runs"), "keep": 2},
        "failure": {"max_restarts": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def trainctl(*args: str, env: dict | None = None, timeout: float = 180, cwd: Path = REPO):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def digits_shards(directory: Path) -> list[str]:
    """The digits example's train/eval shards under `directory`, made by the real CLI; as --set args."""
    args = []
    for split in ("train", "eval"):
        out = directory / f"digits-{split}"
        if not (out / "manifest.json").exists():
            result = trainctl("data", "shard", f"examples.digits.data:digits_{split}", "--out", str(out))
            assert result.returncode == 0, result.stderr
        args += ["--set", f"data.{split}.path={out}"]
    return args


def job_record(job_id: str = "j-1", state: str = "RUNNING", **fields):
    """A controller job record (orchestrator.control.record.JobRecord) for unit tests."""
    from orchestrator.control.record import JobRecord

    spec = fields.pop("spec", None) or {"name": "j", "entrypoint": "tests.jobs.train_fns:gated",
                                        "resources": {"workers": 2}}
    now = time.time()
    return JobRecord.model_validate({
        "id": job_id, "name": job_id, "spec": spec, "state": state, "priority": 0, "submitted_at": now,
        "checkpoint_root": f"/tmp/ckpt/{job_id}", "log_path": f"/tmp/logs/{job_id}.log", **fields})
