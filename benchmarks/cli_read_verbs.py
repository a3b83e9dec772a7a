"""The CLI's read verbs end to end: over Ray (before) and over the controller's HTTP API (after).

    .venv/bin/python benchmarks/cli_read_verbs.py [--repeats 5] [--json OUT]

Starts its own head with `trainctl cluster up` (a temporary TRAINCTL_HOME and state, 2 CPUs),
runs one small 2-rank job to the end so that every verb has something to show, then times
each verb as a user runs it: the `trainctl` executable in a fresh process, wall time until
it exits, median of --repeats. The same run times both paths:
  ray   TRAINCTL_API=0 in the client's environment: import Ray, ray.init, call the actor
        (what every read verb did before the HTTP API)
  http  the default: the controller's HTTP API, from api.json in the head's state directory
`--help` connects to nothing; it is timed on both rows for the import cost alone.
Besides the wall time, the CPU time (user+sys) of the verb's process: on a machine busy with
other work the wall time grows with the load, the CPU time hardly. The load average is printed.
The goal (issue 14 §4) is <= 0.3 s wall for every verb over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINCTL = [str(Path(sys.executable).with_name("trainctl"))] if Path(sys.executable).with_name("trainctl").exists() \
    else [sys.executable, "-m", "orchestrator"]

JOB = """\
name: bench-read
entrypoint: tests.jobs.train_fns:gated
working_dir: {root}
config: {{epochs: 2, steps: 3}}
resources: {{workers: 2, cpus_per_worker: 1, placement: pack}}
checkpoint: {{storage: {runs}}}
"""


def _verbs(job_id: str) -> dict[str, list[str]]:
    return {"--help": ["--help"], "list": ["list"], "status JOB": ["status", job_id],
            "logs JOB": ["logs", job_id], "top --once": ["top", "--once"]}


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(args: list[str], env: dict, check: bool = True) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s, the process); one child at a time, so the children's CPU delta is its own."""
    cpu, started = _cpu_of_children(), time.perf_counter()
    done = subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    took, cpu = time.perf_counter() - started, _cpu_of_children() - cpu
    if check and done.returncode != 0:
        raise RuntimeError(f"trainctl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return took, cpu, done


def measure_cli_read_verbs(repeats: int = 5) -> list[dict]:
    """[{verb, ray_s, http_s, ray_cpu_s, http_cpu_s, load}], medians of `repeats` fresh processes each."""
    root = Path(tempfile.mkdtemp(prefix="trainctl-bench-cli-"))
    env = {**os.environ, "TRAINCTL_HOME": str(root / "home"), "TRAINCTL_STATE": str(root / "state"),
           "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("TRAINCTL_API", None)
    _run(["cluster", "up", "--num-cpus", "2"], env)
    try:
        (root / "job.yaml").write_text(JOB.format(root=ROOT, runs=root / "runs"))
        job_id = _run(["submit", str(root / "job.yaml")], env)[2].stdout.strip()
        deadline = time.monotonic() + 300
        while json.loads(_run(["status", job_id, "--json"], env)[2].stdout)["state"] not in (
                "SUCCEEDED", "FAILED", "CANCELLED"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} did not end in 300 s")
            time.sleep(0.5)
        rows = []
        for verb, args in _verbs(job_id).items():
            row = {"verb": verb}
            for path, api in (("ray", "0"), ("http", "1")):
                _run(args, {**env, "TRAINCTL_API": api})  # warm: the first run of a path reads files cold
                runs = [_run(args, {**env, "TRAINCTL_API": api}) for _ in range(repeats)]
                row[f"{path}_s"] = statistics.median(r[0] for r in runs)
                row[f"{path}_cpu_s"] = statistics.median(r[1] for r in runs)
            row["load"] = os.getloadavg()[0]
            rows.append(row)
        return rows
    finally:
        _run(["cluster", "down"], env, check=False)
        shutil.rmtree(root, ignore_errors=True)


def print_rows(rows: list[dict]) -> None:
    print(f"{'':<12} {'wall, median':^27} {'CPU (user+sys), median':^27}")
    print(f"{'verb':<12} {'ray (before)':>13} {'http (after)':>13} {'ray (before)':>13} {'http (after)':>13} "
          f"{'load avg':>9}")
    for r in rows:
        print(f"{r['verb']:<12} {r['ray_s']:>12.3f}s {r['http_s']:>12.3f}s {r['ray_cpu_s']:>12.3f}s "
              f"{r['http_cpu_s']:>12.3f}s {r['load']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = measure_cli_read_verbs(args.repeats)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
