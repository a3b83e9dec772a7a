"""What trainctl costs: the same DDP loop under trainctl, torchrun and Ray Train.

    .venv/bin/python benchmarks/overhead.py [--steps 300] [--warmup 30] [--repeats 1] [--json OUT]

One Ray cluster is started first (in this process, on 127.0.0.1) and shared by
trainctl and Ray Train, so both are measured against a cluster that is already up;
each system also runs one short untimed job first, so all three are measured warm.
Then, per repeat, each system runs benchmarks/ddp_loop.py with 2 ranks (gloo,
one thread each) while the other two are idle.

Printed:
  (a) steady-state steps/s of each (steps after warm-up / time they took, from the
      step timestamps of rank 0) and the ratios trainctl/torchrun (goal >= 0.97)
      and trainctl/Ray Train (goal >= 1.0);
  (b) seconds from submit (client.submit / TorchTrainer(...).fit() / launching
      torchrun) to the end of the first training step, wall clock of this machine
      (goal: trainctl <= half of Ray Train's).
With --repeats N > 1 every number is the median over the N runs.
  (c) a fast start (issue 16 §3): submit -> first step of a trivial job (the same loop, 3
      steps) with 1 and with 2 workers, each system --startup-repeats times (median, default
      5) in the same run, and the ratios trainctl/torchrun (goal <= 1.0) and trainctl/Ray Train;
  (d) launch+teardown CPU-seconds of a trivial one-worker trainctl job (benchmarks/launch_cost.py,
      median of --launch-jobs; goal <= 1.0).
--startup-only skips (a)/(b).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Everything on 127.0.0.1, before Ray is imported anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers (Ray Train's) import benchmarks.ddp_loop from the repository; they inherit
# this from the Ray head this process starts.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import ddp_loop  # noqa: E402

WORKERS = 2
SYSTEMS = ("trainctl", "torchrun", "ray_train")
LABELS = {"trainctl": "trainctl", "torchrun": "torchrun", "ray_train": "Ray Train"}
GOAL_VS_TORCHRUN = 0.97  # trainctl steps/s / torchrun steps/s
GOAL_VS_RAY_TRAIN = 1.0  # trainctl steps/s / Ray Train steps/s
GOAL_STARTUP = 0.5  # trainctl submit->first step / Ray Train's
GOAL_FAST_START = 1.0  # trivial job: trainctl submit->first step / torchrun's (issue 16 §3)
GOAL_LAUNCH_CPU_S = 1.0  # CPU-s of launch and teardown of a trivial job (issues 14 and 16)
STARTUP_WORKERS = (1, 2)
TRIVIAL_STEPS = 3
RUN_TIMEOUT_S = 600.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one run of each system --------------------------------------------------------------
# Each returns (t_submit, t_done, extra): t_submit is time.time() just before the
# launch call; the result JSON written by rank 0 holds the rest.


class Trainctl:
    name = "trainctl"

    def __init__(self, scratch: Path, report_every: int):
        from orchestrator.client.api import Client

        self.client = Client()  # reuses this process's Ray connection (cluster/connect.py)
        self.scratch, self.report_every = scratch, report_every

    def run(self, out: Path, steps: int, warmup: int, workers: int = WORKERS) -> tuple[float, float, dict]:
        spec = {
            "name": "bench-overhead",
            "entrypoint": "benchmarks.ddp_loop:trainctl_main",
            "working_dir": str(ROOT),
            "config": {"out": str(out), "steps": steps, "warmup": warmup,
                       "report_every": self.report_every},
            "resources": {"workers": workers, "cpus_per_worker": 1, "gpus_per_worker": 0},
            "strategy": {"name": "ddp", "options": dict(ddp_loop.DDP_KWARGS)},
            "checkpoint": {"storage": str(self.scratch / "trainctl-runs")},
            "failure": {"max_restarts": 0},
        }
        t_submit = time.time()
        job_id = self.client.submit(spec)
        t_submitted = time.time()
        job = self.client.wait(job_id, timeout_s=RUN_TIMEOUT_S)  # the client's default 0.5 s poll
        t_done = time.time()
        if job["state"] != "SUCCEEDED":
            logs, _ = self.client.read_logs(job_id)
            raise RuntimeError(f"trainctl job {job_id} ended {job['state']}: {job.get('error')}\n{logs[-3000:]}")
        # When the controller/supervisor recorded each state (same machine clock).
        states = {h["state"]: h["at"] - t_submit for h in job["history"]}
        return t_submit, t_done, {"submit_call_s": t_submitted - t_submit, "job_id": job_id,
                                  "states_s": states}


class Torchrun:
    name = "torchrun"

    def run(self, out: Path, steps: int, warmup: int, workers: int = WORKERS) -> tuple[float, float, dict]:
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        cmd = launcher + [
            "--nproc_per_node", str(workers), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()),
            str(ROOT / "benchmarks" / "ddp_loop.py"),
            "--out", str(out), "--steps", str(steps), "--warmup", str(warmup),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t_submit = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        t_done = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return t_submit, t_done, {}


class RayTrain:
    name = "ray_train"

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0

    def run(self, out: Path, steps: int, warmup: int, workers: int = WORKERS) -> tuple[float, float, dict]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self.count += 1
        t_submit = time.time()
        trainer = TorchTrainer(
            ddp_loop.raytrain_main,
            train_loop_config={"out": str(out), "steps": steps, "warmup": warmup},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(self.scratch / "ray-train-runs"),
                                 name=f"bench-overhead-{self.count}"),
        )
        trainer.fit()  # raises if the run failed
        t_done = time.time()
        return t_submit, t_done, {}


# ---- measuring ------------------------------------------------------------------------------

def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(window_s: float) -> float | None:
    """Fraction of all cores busy over the next window_s seconds (None where unknown)."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(window_s)
        b1, t1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        time.sleep(window_s)
        return None
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def wait_until_idle(settle_s: float, max_busy: float, timeout_s: float = 30.0) -> float | None:
    """Every Ray CPU free again (the last job's actors and reservations are gone), then
    wait for a quiet machine: at most `max_busy` of all cores busy over `settle_s`.
    Returns the busy fraction measured last (reported with the run)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = ray.cluster_resources().get("CPU", 0.0)
        if ray.available_resources().get("CPU", 0.0) >= total:
            break
        time.sleep(0.1)
    else:
        log("warning: Ray CPUs still in use after the previous run; measuring anyway")
    busy = machine_busy(settle_s)
    while busy is not None and busy > max_busy and time.monotonic() < deadline:
        busy = machine_busy(settle_s)
    if busy is not None and busy > max_busy:
        log(f"warning: the machine is {busy:.0%} busy with other work; numbers will be noisy")
    return busy


def summarize(result: dict, t_submit: float, t_done: float) -> dict:
    times, warmup = result["step_times"], result["warmup"]
    steady = len(times) - warmup
    span = times[-1] - times[warmup - 1]
    gaps = sorted(b - a for a, b in zip(times[warmup - 1:-1], times[warmup:], strict=True))
    return {
        "steps_per_s": steady / span,
        "step_ms_median": 1000 * statistics.median(gaps),
        "step_ms_p90": 1000 * gaps[int(0.9 * (len(gaps) - 1))],
        "submit_to_first_step_s": times[0] - t_submit,
        # rank 0's process creation; negative: a process Ray had started before the submit
        "submit_to_process_s": (result["t_process_start"] - t_submit
                                if result.get("t_process_start") else float("nan")),
        "submit_to_entrypoint_s": result["t_entered"] - t_submit,
        "submit_to_model_ready_s": result["t_prepared"] - t_submit,
        "submit_to_done_s": t_done - t_submit,
    }


def run_once(system, scratch: Path, tag: str, steps: int, warmup: int, workers: int = WORKERS) -> dict:
    out = scratch / f"{system.name}-{tag}.json"
    t_submit, t_done, extra = system.run(out, steps, warmup, workers)
    if not out.exists():
        raise RuntimeError(f"{system.name}: rank 0 wrote no result to {out}")
    result = json.loads(out.read_text())
    summary = summarize(result, t_submit, t_done)
    if "report_s" in result:
        summary["ctx_report_s"] = result["report_s"]
    return {**summary, **extra}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(runs: dict[str, list[dict]], args) -> dict:
    keys = ("steps_per_s", "step_ms_median", "step_ms_p90", "submit_to_first_step_s",
            "submit_to_process_s", "submit_to_entrypoint_s", "submit_to_model_ready_s", "submit_to_done_s")
    med = {s: {k: median_of(rs, k) for k in keys} for s, rs in runs.items() if rs}
    n = args.repeats
    what = f"median of {n} runs" if n > 1 else "1 run"
    print()
    print(f"DDP MLP {ddp_loop.IN_FEATURES}->{ddp_loop.WIDTH}x{ddp_loop.DEPTH}->{ddp_loop.CLASSES}, "
          f"batch {ddp_loop.BATCH}, {WORKERS} ranks (gloo, 1 thread each), {args.steps} steps "
          f"({args.warmup} warm-up); {what}; cluster already up, each system warmed up once")
    header = (f"{'system':<10} {'steps/s':>8} {'step ms p50':>11} {'p90':>6} {'submit->1st step s':>19} "
              f"{'->process':>9} {'->entry':>8} {'->model':>8} {'->done':>7}")
    print(header)
    print("-" * len(header))
    for s in SYSTEMS:
        if s not in med:
            continue
        m = med[s]
        print(f"{LABELS[s]:<10} {m['steps_per_s']:>8.2f} {m['step_ms_median']:>11.1f} {m['step_ms_p90']:>6.1f} "
              f"{m['submit_to_first_step_s']:>19.2f} {m['submit_to_process_s']:>9.2f} "
              f"{m['submit_to_entrypoint_s']:>8.2f} {m['submit_to_model_ready_s']:>8.2f} "
              f"{m['submit_to_done_s']:>7.2f}")
    if n > 1:
        spread = ", ".join(
            f"{LABELS[s]} {min(r['steps_per_s'] for r in runs[s]):.2f}-{max(r['steps_per_s'] for r in runs[s]):.2f}"
            for s in SYSTEMS if s in runs)
        print(f"steps/s range over the runs: {spread}")
    else:
        print("one run each: on a small or shared machine steps/s moves by several % from run to "
              "run; use --repeats 5 before reading a PASS/MISS")
    print("(seconds after submit: ->process = rank 0's process created, ->entry = training function "
          "entered, ->model = model wrapped in DDP, ->done = the launcher returned / job seen ended)")
    ratios, goals = {}, {}
    print()
    if "trainctl" in med and "torchrun" in med:
        r = med["trainctl"]["steps_per_s"] / med["torchrun"]["steps_per_s"]
        ratios["steps_per_s_trainctl_over_torchrun"] = r
        goals["steps_per_s_trainctl_over_torchrun"] = {"goal": f">= {GOAL_VS_TORCHRUN}", "pass": r >= GOAL_VS_TORCHRUN}
        print(f"(a) steps/s trainctl / torchrun   = {r:.3f}   goal >= {GOAL_VS_TORCHRUN:.2f}   {verdict(r >= GOAL_VS_TORCHRUN)}")
    if "trainctl" in med and "ray_train" in med:
        r = med["trainctl"]["steps_per_s"] / med["ray_train"]["steps_per_s"]
        ratios["steps_per_s_trainctl_over_ray_train"] = r
        goals["steps_per_s_trainctl_over_ray_train"] = {"goal": f">= {GOAL_VS_RAY_TRAIN}", "pass": r >= GOAL_VS_RAY_TRAIN}
        print(f"(a) steps/s trainctl / Ray Train  = {r:.3f}   goal >= {GOAL_VS_RAY_TRAIN:.2f}   {verdict(r >= GOAL_VS_RAY_TRAIN)}")
        t, rt = med["trainctl"]["submit_to_first_step_s"], med["ray_train"]["submit_to_first_step_s"]
        r = t / rt
        ratios["first_step_s_trainctl_over_ray_train"] = r
        goals["first_step_s_trainctl_over_ray_train"] = {"goal": f"<= {GOAL_STARTUP}", "pass": r <= GOAL_STARTUP}
        print(f"(b) submit->first step: trainctl {t:.2f} s, Ray Train {rt:.2f} s, torchrun "
              f"{med.get('torchrun', {}).get('submit_to_first_step_s', float('nan')):.2f} s; "
              f"trainctl / Ray Train = {r:.2f}   goal <= {GOAL_STARTUP:.2f}   {verdict(r <= GOAL_STARTUP)}")
    if "trainctl" in med:
        states = runs["trainctl"][len(runs["trainctl"]) // 2]["states_s"]
        order = ("PENDING", "QUEUED", "STARTING", "RUNNING")
        marks = ", ".join(f"{s} +{states[s]:.2f}" for s in order if s in states)
        print(f"    trainctl job states after submit (one run): {marks}; "
              f"submit() returned after {median_of(runs['trainctl'], 'submit_call_s'):.2f} s")
        if "ctx_report_s" in runs["trainctl"][0]:
            spent = median_of(runs["trainctl"], "ctx_report_s")
            print(f"    trainctl rank 0 spent {spent * 1000:.1f} ms in ctx.report over {args.steps} steps "
                  f"(--report-every {args.report_every})")
    return {"median": med, "ratios": ratios, "goals": goals}


def fast_start(systems, scratch: Path, repeats: int, attempt, settle_s: float, max_busy: float) -> dict:
    """(c): submit -> first step of a trivial job per system and size, median of `repeats`."""
    out: dict = {}
    for workers in STARTUP_WORKERS:
        times: dict[str, list[float]] = {s.name: [] for s in systems}
        for i in range(repeats):
            for system in systems:
                wait_until_idle(settle_s, max_busy)
                r = attempt(system, f"trivial{workers}-{i}", TRIVIAL_STEPS, 1, workers)
                if r is not None:
                    times[system.name].append(r["submit_to_first_step_s"])
                    log(f"  trivial {workers}-worker {LABELS[system.name]}: first step after "
                        f"{r['submit_to_first_step_s']:.2f} s")
        out[workers] = {name: statistics.median(ts) for name, ts in times.items() if ts}
    print()
    print(f"(c) fast start: submit -> first step of a trivial job, median of {repeats}")
    print(f"    {'workers':>7} " + " ".join(f"{LABELS[s]:>10}" for s in SYSTEMS) +
          "  trainctl/torchrun  trainctl/Ray Train")
    ratios = {}
    for workers, med in out.items():
        row = " ".join(f"{med[s]:>9.2f}s" if s in med else f"{'-':>10}" for s in SYSTEMS)
        vs_torchrun = med["trainctl"] / med["torchrun"] if {"trainctl", "torchrun"} <= med.keys() else None
        vs_ray = med["trainctl"] / med["ray_train"] if {"trainctl", "ray_train"} <= med.keys() else None
        ratios[workers] = {"trainctl_over_torchrun": vs_torchrun, "trainctl_over_ray_train": vs_ray}
        print(f"    {workers:>7} {row}  "
              + (f"{vs_torchrun:>8.2f} {verdict(vs_torchrun <= GOAL_FAST_START)}" if vs_torchrun else f"{'-':>13}")
              + (f"  {vs_ray:>12.2f}" if vs_ray else ""))
    print(f"    goal: trainctl <= torchrun (ratio <= {GOAL_FAST_START:.1f})")
    return {"median_s": out, "ratios": ratios}


def launch_cpu(system, jobs: int) -> dict:
    """(d): CPU-s of launch and teardown of a trivial one-worker trainctl job."""
    from benchmarks.launch_cost import measure_launch_cost, print_launch_cost

    cost = measure_launch_cost(system.client, jobs)
    print()
    print("(d) ", end="")
    print_launch_cost(cost)
    print(f"    goal <= {GOAL_LAUNCH_CPU_S:.1f} CPU-s   {verdict(cost['cpu_s'] <= GOAL_LAUNCH_CPU_S)}")
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="first steps left out of steps/s (default 30)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per system; the median is shown")
    parser.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--report-every", type=int, default=1,
                        help="trainctl: ctx.report() every N steps (0: never; default 1, as examples/ do)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of quiet before each run, after the last one's workers are gone")
    parser.add_argument("--max-busy", type=float, default=0.10,
                        help="wait (up to 30 s) until at most this fraction of the machine's cores "
                             "is busy before each run (other users' work skews the numbers)")
    parser.add_argument("--startup-repeats", type=int, default=5,
                        help="(c) runs of the trivial job per system and size (0: skip)")
    parser.add_argument("--launch-jobs", type=int, default=5, help="(d) trivial jobs measured (0: skip)")
    parser.add_argument("--startup-only", action="store_true", help="only (c) and (d)")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system {unknown[0]!r}; choose from {', '.join(SYSTEMS)}")

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="trainctl-bench-"))
    started = time.time()
    log(f"starting a local Ray cluster (4 CPUs on 127.0.0.1); scratch {scratch}")
    # address="local": always a new cluster of our own, never one found in /tmp/ray.
    # The dashboard stays on: Ray Train v2's PlacementGroupCleaner asks the state API
    # (served by the dashboard) whether the run's controller is alive; without it the
    # answer can come back "dead" and the cleaner removes a live run's placement group.
    # namespace: the one trainctl's CLI uses, so its controller is where `trainctl list` looks.
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             namespace="trainctl", log_to_driver=False, logging_level=logging.ERROR)
    try:
        systems = []
        for name in chosen:
            if name == "trainctl":
                systems.append(Trainctl(scratch, args.report_every))
            elif name == "torchrun":
                systems.append(Torchrun())
            else:
                systems.append(RayTrain(scratch))
        failures: list[str] = []

        def attempt(system, tag: str, steps: int, warmup: int, workers: int = WORKERS) -> dict | None:
            try:
                return run_once(system, scratch, tag, steps, warmup, workers)
            except Exception as exc:  # one system failing still leaves the others' numbers
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failures.append(f"{LABELS[system.name]} ({tag}): {type(exc).__name__}: {first}")
                log(f"  FAILED: {failures[-1]}")
                return None

        warm_steps = min(args.steps, 20)
        for system in systems:
            wait_until_idle(0.5, args.max_busy)
            log(f"warm-up run: {LABELS[system.name]} ({warm_steps} steps, not timed)")
            w = attempt(system, "warmup", warm_steps, min(args.warmup, warm_steps - 1))
            if w:
                log(f"  first step after {w['submit_to_first_step_s']:.2f} s")
        runs: dict[str, list[dict]] = {s.name: [] for s in systems}
        for i in range(0 if args.startup_only else args.repeats):
            for system in systems:
                busy = wait_until_idle(args.settle, args.max_busy)
                log(f"run {i + 1}/{args.repeats}: {LABELS[system.name]} ({args.steps} steps)")
                r = attempt(system, f"run{i}", args.steps, args.warmup)
                if r is None:
                    continue
                r["machine_busy_before"] = busy
                runs[system.name].append(r)
                log(f"  {r['steps_per_s']:.2f} steps/s, first step after {r['submit_to_first_step_s']:.2f} s")
        runs = {name: rs for name, rs in runs.items() if rs}
        summary = report(runs, args) if runs else {}
        if args.startup_repeats:
            summary["fast_start"] = fast_start(systems, scratch, args.startup_repeats, attempt,
                                               args.settle, args.max_busy)
        trainctl = next((s for s in systems if s.name == "trainctl"), None)
        if args.launch_jobs and trainctl is not None:
            summary["launch_cpu"] = launch_cpu(trainctl, args.launch_jobs)
        for failure in failures:
            print(f"FAILED run: {failure}")
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"done in {time.time() - started:.0f} s")
    if args.json:
        doc = {
            "config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                       "workers": WORKERS, "report_every": args.report_every,
                       "model": {"in": ddp_loop.IN_FEATURES, "width": ddp_loop.WIDTH,
                                 "depth": ddp_loop.DEPTH, "classes": ddp_loop.CLASSES,
                                 "batch": ddp_loop.BATCH}, "ddp": ddp_loop.DDP_KWARGS},
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "runs": runs, "failures": failures, **summary,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
        log(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
