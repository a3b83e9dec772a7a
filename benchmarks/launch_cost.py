"""What a trivial job costs the cluster: launch+teardown CPU-seconds, and head memory per running job.

    .venv/bin/python benchmarks/launch_cost.py [--jobs 5] [--running 20] [--json OUT]

One local Ray (this process is its driver, the dashboard off) with a fresh trainctl state.
  CPU-s per trivial job   a one-worker job whose function reports one step, submitted and
                          waited for one after another (after one untimed warm-up job). Its
                          cost is the CPU time (user+sys) that every process of this Ray
                          (raylet, GCS, controller, supervisors, workers, also those that
                          ended meanwhile) spent from submit until a second after the job
                          ended, minus what the same Ray spends idle over as long, plus this
                          client's own. Each process is sampled every 50 ms (a process that
                          ends loses at most its last 50 ms). Median over --jobs, and split
                          per kind of process.
  head MB per running job `--running` one-worker jobs that sleep: the growth of the resident
                          memory (RSS and USS) of every process of this Ray except the jobs'
                          own ranks (which live on worker nodes in a real cluster), divided
                          by the number of jobs.
`measure_launch_cost` and `measure_head_memory` are what benchmarks/overhead.py and
benchmarks/control_plane.py print as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRAINCTL_METRICS", "0")  # no /metrics server: not what is measured
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

# The job's code: a working_dir of one small module, as a real trivial job ships.
JOB_MODULE = '''
import os, time

def one_step(ctx):
    ctx.report({"step": 1, "loss": 1.0})

def sleeps(ctx):
    # until the benchmark drops the file, or a minute at most
    deadline = time.time() + 60
    while not os.path.exists(ctx.config["until"]) and time.time() < deadline:
        time.sleep(0.2)
    ctx.report({"step": 1, "loss": 1.0})
'''


ZYGOTE = "orchestrator.runtime.zygote"


def kind_of(proc: psutil.Process) -> str:
    """What a Ray process is, from its title (Ray workers rename themselves ray::Class.method);
    a node's zygote (cluster/rank_host.py) and the rank processes it forks, by their command line."""
    try:
        cmd = " ".join(proc.cmdline()[:3])
        if ZYGOTE in cmd:  # a fork keeps its parent's command line
            parent = proc.parent()
            return "rank process" if parent is not None and ZYGOTE in " ".join(parent.cmdline()[:3]) else "zygote"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    cmd = " ".join(cmd.split()[:2])
    if cmd.startswith("ray::"):
        name = cmd.split()[0][5:].split(".")[0]
        return "idle worker" if name in ("IDLE", "") else name
    for known in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env", "monitor.py"):
        if known in cmd:
            return known
    return "other"


def tree() -> list[psutil.Process]:
    """Every process of the Ray this driver started (they are its descendants)."""
    return psutil.Process().children(recursive=True)


def cpu_of(proc: psutil.Process, with_children: bool = True) -> float:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    total = t.user + t.system
    if with_children:  # the ended children it reaped: workers and supervisors that exited
        total += t.children_user + t.children_system
    return total


class Sampler:
    """Per process, the last CPU time seen (every 50 ms): the per-kind split of a job's cost."""

    def __init__(self, every_s: float = 0.05):
        self.every_s = every_s
        self.alive: set[int] = set()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.alive = set()
        for proc in tree():
            self.alive.add(proc.pid)
            # a zygote's ended rank processes are in its children's times (reaped by it), so a
            # rank that lived less than a sample period still counts
            k = kind_of(proc)
            if k not in ("gone", "idle worker") or proc.pid not in self.kind:
                self.kind[proc.pid] = k
            cpu = cpu_of(proc, with_children=self.kind[proc.pid] == "zygote")
            if proc.pid not in self.first:  # a process started during the job: all its CPU counts
                self.first[proc.pid] = 0.0 if self._started else cpu
            self.last[proc.pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self):
        self._started = False
        self._sample()  # what exists before the job: its growth counts, not its past
        self._started = True
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for pid, last in self.last.items():
            kind = self.kind.get(pid, "other")
            if kind == "rank process" and pid not in self.alive:
                continue  # reaped: its whole CPU time is in the zygote's children's times
            if kind == "zygote":
                kind = "zygote + ended ranks"
            out[kind] += last - self.first.get(pid, 0.0)
        return dict(out)


def _job_dir() -> Path:
    wd = Path(tempfile.mkdtemp(prefix="trainctl-trivial-"))
    (wd / "trivial_job.py").write_text(JOB_MODULE)
    return wd


def trivial_spec(wd: Path, scratch: Path, name: str = "trivial", fn: str = "one_step",
                 config: dict | None = None) -> dict:
    return {"name": name, "entrypoint": f"trivial_job:{fn}", "working_dir": str(wd),
            "config": config or {}, "resources": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"storage": str(scratch / "runs")}, "failure": {"max_restarts": 0}}


def idle_rate(seconds: float = 3.0) -> float:
    """CPU-s per second this Ray spends with no job (heartbeats, the controller's loop)."""
    t0 = time.perf_counter()
    with Sampler() as sampler:
        time.sleep(seconds)
    return sum(sampler.by_kind().values()) / (time.perf_counter() - t0)


def measure_launch_cost(client, jobs: int = 5, poll_s: float = 0.1) -> dict:
    """CPU-s of a trivial one-worker job, median of `jobs` (see the module docstring)."""
    wd, scratch = _job_dir(), Path(tempfile.mkdtemp(prefix="trainctl-launch-"))
    client.wait(client.submit(trivial_spec(wd, scratch, "warmup")), poll_s=poll_s, timeout_s=300)
    time.sleep(1.0)
    rate = idle_rate()
    rows = []
    me = psutil.Process()
    for i in range(jobs):
        with Sampler() as sampler:
            mine0, t0 = cpu_of(me, with_children=False), time.perf_counter()
            t_submit = time.time()
            job = client.wait(client.submit(trivial_spec(wd, scratch, f"trivial-{i}")),
                              poll_s=poll_s, timeout_s=300)
            # the supervisor and workers exit after the job ended: their teardown counts too
            time.sleep(1.0)
            wall = time.perf_counter() - t0
            client_cpu = cpu_of(me, with_children=False) - mine0
        if job["state"] != "SUCCEEDED":
            raise RuntimeError(f"trivial job ended {job['state']}: {job.get('error')}")
        by_kind = sampler.by_kind()
        ray_cpu = sum(by_kind.values()) - rate * wall
        running = next((h["at"] for h in job["history"] if h["state"] == "RUNNING"), None)
        rows.append({"cpu_s": ray_cpu + client_cpu, "ray_cpu_s": ray_cpu, "client_cpu_s": client_cpu,
                     "wall_s": wall, "by_kind": by_kind,
                     "submit_to_running_s": running - t_submit if running else None,
                     "submit_to_end_s": job["ended_at"] - t_submit})
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    return {
        "jobs": jobs, "idle_cpu_per_s": rate,
        "cpu_s": statistics.median(r["cpu_s"] for r in rows),
        "client_cpu_s": statistics.median(r["client_cpu_s"] for r in rows),
        "wall_s": statistics.median(r["wall_s"] for r in rows),
        "submit_to_end_s": statistics.median(r["submit_to_end_s"] for r in rows),
        "by_kind": {k: statistics.median(r["by_kind"].get(k, 0.0) for r in rows) for k in kinds},
        "runs": rows,
    }


def _head_memory(exclude_kinds=("WorkerActor", "rank process")) -> tuple[float, float]:
    rss = uss = 0.0
    for proc in tree():
        if kind_of(proc) in exclude_kinds:
            continue
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        uss += info.uss
    return rss / 2**20, uss / 2**20


def measure_head_memory(client, running: int = 20, timeout_s: float = 300.0) -> dict:
    """Head MB per running job: `running` sleeping one-worker jobs (cpus_per_worker 1 each, so
    the Ray needs that many logical CPUs)."""
    wd, scratch = _job_dir(), Path(tempfile.mkdtemp(prefix="trainctl-mem-"))
    until = scratch / "release"
    time.sleep(2.0)  # the warm-up's processes have gone
    rss0, uss0 = _head_memory()
    ids = [client.submit(trivial_spec(wd, scratch, f"sleeper-{i}", "sleeps", {"until": str(until)}))
           for i in range(running)]
    deadline = time.monotonic() + timeout_s
    while True:
        states = [client.get(j)["state"] for j in ids]
        if all(s == "RUNNING" for s in states):
            break
        if time.monotonic() > deadline or any(s in ("FAILED", "CANCELLED") for s in states):
            raise RuntimeError(f"sleeping jobs did not all run: {states}")
        time.sleep(0.5)
    time.sleep(2.0)  # their reporters have connected
    rss1, uss1 = _head_memory()
    until.write_text("")
    for j in ids:
        client.wait(j, poll_s=0.5, timeout_s=timeout_s)
    return {"running": running, "rss_mb_per_job": (rss1 - rss0) / running,
            "uss_mb_per_job": (uss1 - uss0) / running, "rss_before_mb": rss0, "rss_running_mb": rss1}


def start_ray(num_cpus: int):
    import logging

    import ray

    os.environ["TRAINCTL_STATE"] = tempfile.mkdtemp(prefix="trainctl-bench-state-")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, namespace="trainctl")
    from orchestrator.client.api import Client

    return Client()


def print_launch_cost(cost: dict) -> None:
    print(f"launch+teardown CPU-s per trivial one-worker job: {cost['cpu_s']:.2f} "
          f"(median of {cost['jobs']}; submit->ended {cost['submit_to_end_s']:.2f} s; client {cost['client_cpu_s']:.2f}; "
          f"idle Ray {cost['idle_cpu_per_s']:.3f} CPU-s/s subtracted)")
    for kind, cpu in sorted(cost["by_kind"].items(), key=lambda kv: -kv[1]):
        if cpu >= 0.01:
            print(f"    {kind:<20} {cpu:6.2f}")


def print_head_memory(mem: dict) -> None:
    print(f"head memory per running job: {mem['rss_mb_per_job']:.1f} MB RSS, {mem['uss_mb_per_job']:.1f} MB USS "
          f"({mem['running']} sleeping one-worker jobs; head {mem['rss_before_mb']:.0f} -> {mem['rss_running_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--running", type=int, default=20, help="0: skip the memory measurement")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    client = start_ray(max(2, args.running))
    cost = measure_launch_cost(client, args.jobs)
    print_launch_cost(cost)
    out = {"launch": cost}
    if args.running:
        mem = measure_head_memory(client, args.running)
        print_head_memory(mem)
        out["head_memory"] = mem
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
