"""The control plane at scale: submit throughput, scheduling tick, list and status latency.

    .venv/bin/python benchmarks/control_plane.py [--sizes 100,1000,10000] [--queued 1000]

For each size N the controller's own code runs in this process (the actor class, not the
actor, so its methods can be timed one by one) against a fresh store: N jobs submitted and
ended (cancelled), plus `--queued` jobs that wait for room (4 workers on a 2-CPU Ray, so
every tick plans all of them). Printed per size:
  submit/s          controller.submit of a small spec (no working_dir package)
  tick p50 / max    one scheduling tick over every job (goal < 50 ms at 1,000 queued and
                    10,000 finished)
  list / status     the controller's list_jobs / get_job, plus pickling what they return
                    (what crosses to the client), median of 5 (goals < 0.5 s / < 50 ms)
  list bytes        the size of that answer
Run it on HEAD and on an older commit to compare; it only uses the controller's public
methods and `_tick`.

Launch cost (issue 14 §4; --launch-jobs 0 skips it): in a fresh local Ray of its own
(benchmarks/launch_cost.py, a subprocess), the launch+teardown CPU-seconds of a trivial
one-worker job (median of --launch-jobs) and the head's memory growth per running job
(--running sleeping one-worker jobs), printed beside the numbers of the per-job supervisor
actors they replaced (LAUNCH_BEFORE, measured the same way on commit 5f71be5).

CLI read verbs (issue 14 §4; --cli-repeats 0 skips it): on a head of its own started by
`trainctl cluster up` (benchmarks/cli_read_verbs.py, a subprocess), the end-to-end wall time
of `trainctl --help`, `list`, `status JOB`, `logs JOB` and `top --once` in a fresh process,
median of --cli-repeats, before (over Ray: TRAINCTL_API=0) and after (over the controller's
HTTP API) in the same run; goal <= 0.3 s after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["TRAINCTL_METRICS"] = "0"  # no /metrics server in this process
sys.path[:0] = [str(ROOT)]  # this checkout's packages, not benchmarks/strategies.py


def _spec(i: int) -> dict:
    return {"name": f"bench-{i}", "entrypoint": "tests.jobs.restart_fns:traced_steps",
            "working_dir": str(ROOT), "config": {"steps": 10, "step_s": 0.0, "trace": "/dev/null"},
            "resources": {"workers": 4, "cpus_per_worker": 1}, "checkpoint": {"storage": "/tmp/unused"}}


async def measure(controller_cls, size: int, queued: int) -> dict:
    state = tempfile.mkdtemp(prefix="trainctl-bench-state-")
    os.environ["TRAINCTL_STATE"] = state        # this code's store
    os.environ["TRAINCTL_STATE_DIR"] = state    # an older commit's
    ctrl = controller_cls()
    ctrl._ensure_loop = lambda: None  # no background loop: ticks are driven (and timed) here
    started = time.perf_counter()
    ended = []
    for i in range(size):
        ended.append((await ctrl.submit(_spec(i)))["id"])
    submit_s = time.perf_counter() - started
    for job_id in ended:
        await ctrl.cancel(job_id)
    for i in range(queued):
        await ctrl.submit(_spec(size + i))
    await ctrl._tick()  # the first tick writes every queued job's reason once
    ticks = []
    for _ in range(10):
        t0 = time.perf_counter()
        await ctrl._tick()
        ticks.append(time.perf_counter() - t0)
    listed = await ctrl.list_jobs()
    list_times, status_times = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        answer = pickle.dumps(await ctrl.list_jobs())
        list_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pickle.dumps(await ctrl.get_job(ended[len(ended) // 2] if ended else listed[0]["id"]))
        status_times.append(time.perf_counter() - t0)
    ctrl.store.close()
    return {"size": size, "queued": queued, "submit_per_s": size / submit_s if size else 0.0,
            "tick_p50_s": statistics.median(ticks), "tick_max_s": max(ticks),
            "list_s": statistics.median(list_times), "status_s": statistics.median(status_times),
            "list_bytes": len(answer)}


# Per-job supervisor actors (commit 5f71be5), benchmarks/launch_cost.py --jobs 5 --running 20
# on the 2-core development machine.
LAUNCH_BEFORE = {"cpu_s": 2.91, "supervisor_cpu_s": 0.63, "worker_cpu_s": 1.90,
                 "rss_mb_per_job": 149.6, "uss_mb_per_job": 65.5}


def launch_cost_section(jobs: int, running: int) -> dict:
    """Launch CPU-s per trivial job and head MB per running job, now and before."""
    import json
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="trainctl-launch-")) / "launch.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "launch_cost.py"), "--jobs", str(jobs),
                    "--running", str(running), "--json", str(out)], check=True, capture_output=True)
    now = json.loads(out.read_text())
    launch, mem = now["launch"], now.get("head_memory")
    b = LAUNCH_BEFORE
    print()
    print(f"launch cost (trivial one-worker job, median of {jobs})   before    now   goal")
    print(f"  CPU-s per job, launch+teardown               {b['cpu_s']:>6.2f} {launch['cpu_s']:>6.2f}  <= 1.0")
    print(f"    of which the job's supervisor              {b['supervisor_cpu_s']:>6.2f} "
          f"{launch['by_kind'].get('SupervisorHost', launch['by_kind'].get('Supervisor', 0.0)):>6.2f}")
    print(f"    of which its worker (rank process)         {b['worker_cpu_s']:>6.2f} "
          f"{launch['by_kind'].get('WorkerActor', 0.0):>6.2f}")
    if mem:
        print(f"  head MB per running job ({running} running), RSS  {b['rss_mb_per_job']:>6.1f} "
              f"{mem['rss_mb_per_job']:>6.1f}  <= 5")
        print(f"  head MB per running job, USS                 {b['uss_mb_per_job']:>6.1f} {mem['uss_mb_per_job']:>6.1f}")
    return now


def cli_read_verbs_section(repeats: int) -> list[dict]:
    """Each read verb's wall time over Ray (before) and over HTTP (after)."""
    import json
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="trainctl-cli-")) / "cli.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cli_read_verbs.py"), "--repeats", str(repeats),
                    "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    print()
    print(f"CLI read verbs, end to end (a fresh process, median of {repeats})")
    print(f"  {'trainctl':<14} {'before (Ray)':>12} {'after (HTTP)':>12}   goal      CPU s before/after")
    for r in rows:
        print(f"  {r['verb']:<14} {r['ray_s']:>11.3f}s {r['http_s']:>11.3f}s   <= 0.3 s  "
              f"{r['ray_cpu_s']:.3f}/{r['http_cpu_s']:.3f} (load {r['load']:.1f})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--launch-jobs", type=int, default=5, help="launch cost: trivial jobs timed (0: skip)")
    parser.add_argument("--running", type=int, default=20, help="launch cost: jobs running at once for head memory")
    parser.add_argument("--cli-repeats", type=int, default=5, help="CLI read verbs: runs per verb and path (0: skip)")
    args = parser.parse_args()
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        from orchestrator.control.controller import Controller
    except ImportError:  # before the control plane moved into orchestrator/control/
        from orchestrator.control.controller import Controller
    controller_cls = Controller.__ray_actor_class__
    rows = [asyncio.run(measure(controller_cls, int(n), args.queued)) for n in args.sizes.split(",")]
    print(f"{'finished':>9} {'queued':>7} {'submit/s':>9} {'tick p50':>9} {'tick max':>9} "
          f"{'list':>8} {'status':>8} {'list MB':>8}")
    for r in rows:
        print(f"{r['size']:>9} {r['queued']:>7} {r['submit_per_s']:>9.0f} {r['tick_p50_s'] * 1e3:>7.1f}ms "
              f"{r['tick_max_s'] * 1e3:>7.1f}ms {r['list_s']:>7.3f}s {r['status_s'] * 1e3:>6.1f}ms "
              f"{r['list_bytes'] / 1e6:>8.2f}")
    ray.shutdown()
    if args.launch_jobs:
        launch_cost_section(args.launch_jobs, args.running)
    if args.cli_repeats:
        cli_read_verbs_section(args.cli_repeats)


if __name__ == "__main__":
    main()
