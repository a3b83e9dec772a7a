"""Scheduling on a shared cluster (issue 15's benchmark). Not a test: it prints numbers.

    .venv/bin/python benchmarks/scheduling.py [--part 1|2|3] ...

1. Preemption: a simulated 2-node cluster (2 CPUs each) full of low-priority work (a 2-worker
   job reporting every step, checkpoints only when asked); a high-priority job is submitted.
   Printed: seconds from its submit to its first step (goal <= 15 s, the victim's just-in-time
   checkpoint included) and the steps the victim redid after it resumed (goal 0).
2. Elastic goodput: a 2-node job loses its worker node for --outage-s seconds, then the node
   returns. The same job runs twice, elastic (min_workers 1: it shrinks, then grows back) and
   at a fixed size (it waits for the node). Printed: trainctl's goodput (productive step time
   over wall time, `trainctl status`), samples per second over the whole run, and the
   elastic/fixed ratios (goal >= 1.3x).
3. Fair share between queues (SCHED's part, `fair_share` below).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of its own
os.environ.setdefault("TRAINCTL_METRICS_PORT", "0")  # the controller's /metrics on a free port: goodput needs the telemetry
os.environ.setdefault("TRAINCTL_GROW_COOLDOWN_S", "5")  # the controller this benchmark starts reads it
sys.path[:0] = [str(ROOT)]

from tests.helpers import wait_for  # noqa: E402  (the tests' one condition-wait helper)


# ---- parts 1 and 2 (PREEMPT) -----------------------------------------------------------------
def _start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    return cluster


def _stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def _spec(name: str, work: Path, out: Path, **fields) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "entrypoint": "tests.jobs.preempt_fns:steady", "working_dir": str(ROOT),
            "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"},
            "checkpoint": {"storage": str(work / "runs"), "keep": 2},
            "failure": {"max_restarts": 3, "restart_timeout_s": 600},
            "config": {"steps": 100, "step_s": 0.05, "out": str(out)}}
    for key, value in fields.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def _redone_steps(out: Path) -> int:
    """Steps a rank ran more than once (tests/jobs/preempt_fns.steady's logs)."""
    redone = 0
    for path in out.glob("rank*.txt"):
        steps = [int(line.split()[1]) for line in path.read_text().splitlines()]
        redone += len(steps) - len(set(steps))
    return redone


def preemption(work: Path) -> dict:
    from orchestrator.client.api import Client

    cluster = _start_cluster()
    try:
        client = Client(cluster.address)
        low = client.submit(_spec("low", work, work / "low", priority=0,
                                  resources={"workers": 2, "cpus_per_worker": 2},
                                  checkpoint={"every_n_steps": 100_000},
                                  preemption={"min_runtime_s": 0},
                                  config={"steps": 400, "step_s": 0.05}))
        wait_for(lambda: (client.get(low)["progress"].get("step") or 0) >= 20, 300)
        submitted = time.monotonic()
        high = client.submit(_spec("high", work, work / "high", priority=10,
                                   config={"steps": 20, "step_s": 0.05}))
        wait_for(lambda: (client.get(high)["progress"].get("step") or 0) >= 1, 300, interval=0.02)
        first_step_s = time.monotonic() - submitted
        victim = client.get(low)
        jit = victim["preemptions"][0] if victim["preemptions"] else {}
        client.wait(high, timeout_s=300)
        done = client.wait(low, timeout_s=600)
        return {"first_step_s": first_step_s, "victim_saved": jit.get("saved"), "victim_step": jit.get("step"),
                "victim_release_s": jit.get("seconds"), "redone_steps": _redone_steps(work / "low"),
                "victim_state": done["state"], "victim_restarts": len(done["restarts"])}
    finally:
        _stop_cluster(cluster)


def _node_outage_run(work: Path, name: str, elastic: bool, steps: int, outage_at_step: int, outage_s: float) -> dict:
    from orchestrator.client.api import Client

    cluster = _start_cluster()
    try:
        client = Client(cluster.address)
        resources = {"workers": 2, "cpus_per_worker": 2, **({"min_workers": 1} if elastic else {})}
        job = client.submit(_spec(name, work, work / name, resources=resources,
                                  config={"steps": steps, "step_s": 0.05}))
        record = wait_for(lambda: (j := client.get(job))["state"] == "RUNNING"
                       and (j["progress"].get("step") or 0) >= outage_at_step and j, 300)
        worker = next(n for n in cluster.worker_nodes if n.node_id in {p["node_id"] for p in record["placement"]})
        cluster.remove_node(worker, allow_graceful=False)
        time.sleep(outage_s)  # the scripted outage itself (nothing is waited on here)
        cluster.add_node(num_cpus=2)
        done = client.wait(job, timeout_s=900)
        admitted = next(h["at"] for h in done["history"] if h["state"] == "STARTING")
        wall = done["ended_at"] - admitted if done.get("ended_at") else time.time() - admitted
        # samples that counted: each rank's steps once (a redone step counts once), 8 per step
        samples = 8 * len({(p.name, int(line.split()[1])) for p in (work / name).glob("rank*.txt")
                           for line in p.read_text().splitlines()})
        return {"state": done["state"], "goodput": (done.get("health") or {}).get("goodput_ratio"),
                "wall_s": wall, "samples_per_s": samples / wall if wall else None,
                "restarts": len(done["restarts"]), "resizes": len(done["preemptions"])}
    finally:
        _stop_cluster(cluster)


def elastic_goodput(work: Path, steps: int, outage_s: float) -> dict:
    elastic = _node_outage_run(work, "elastic", True, steps, 20, outage_s)
    fixed = _node_outage_run(work, "fixed", False, steps, 20, outage_s)
    return {"elastic": elastic, "fixed": fixed}


def _print_preemption(r: dict) -> None:
    print("1. preemption (2 nodes x 2 CPUs, full of low-priority work)")
    print(f"   high-priority job: submit -> first step   {r['first_step_s']:.1f} s   (goal <= 15 s)")
    print(f"   victim: just-in-time checkpoint {'saved' if r['victim_saved'] else 'NOT saved'} at step "
          f"{r['victim_step']}, gang given back in {r['victim_release_s'] or 0:.1f} s")
    print(f"   victim: steps redone after resuming      {r['redone_steps']}   (goal 0); it ended "
          f"{r['victim_state']} with {r['victim_restarts']} restarts")


def _print_goodput(r: dict, outage_s: float) -> None:
    e, f = r["elastic"], r["fixed"]
    print(f"2. a node lost for {outage_s:g} s during a 2-node job, then back")
    for name, x in (("elastic", e), ("fixed", f)):
        print(f"   {name:8s} {x['state']:9s} wall {x['wall_s']:6.1f} s   goodput {100 * (x['goodput'] or 0):5.1f}%   "
              f"{x['samples_per_s']:.1f} samples/s   restarts {x['restarts']}   resizes {x['resizes']}")
    if e["goodput"] and f["goodput"]:
        print(f"   elastic / fixed: goodput {e['goodput'] / f['goodput']:.2f}x, samples/s "
              f"{e['samples_per_s'] / f['samples_per_s']:.2f}x   (goal >= 1.3x)")


# ---- part 3 (SCHED) ------------------------------------------------------------------------
def simulate_fair_share(weights: dict[str, float], hours: float = 1.0, nodes: int = 4, cpus_per_node: int = 8,
                        tick_s: float = 5.0, backlog: int = 10, seed: int = 0) -> dict:
    """Queues with these weights (no quotas, equal priority) keep `backlog` jobs waiting each, for
    `hours` of simulated time; the controller's pure scheduler (control/scheduler.plan) decides
    every `tick_s` on a synthetic clock. Jobs: 1, 2 or 4 workers of 1 CPU, 2 to 15 minutes each.
    Returns each queue's share of the CPU-seconds used, over the whole run and its second half."""
    import random

    from orchestrator.control.scheduler import (
        Demand,
        NodeFree,
        QueuedJob,
        QueueQuota,
        RunningJob,
        plan,
        take,
    )

    rng = random.Random(seed)
    total = [NodeFree(cpus_per_node) for _ in range(nodes)]
    free = list(total)
    queues = {name: QueueQuota(name, weight=w) for name, w in weights.items()}
    queued: dict[str, QueuedJob] = {}
    running: dict[str, tuple[RunningJob, float, list[float]]] = {}  # id -> (job, ends at, CPUs per node)
    used = {name: 0.0 for name in weights}
    used_late = {name: 0.0 for name in weights}
    counter = 0
    plan_s = []
    end = hours * 3600
    now = 0.0
    while now < end:
        for job_id, (_, ends_at, held) in list(running.items()):
            if ends_at <= now:
                del running[job_id]
                free = [NodeFree(n.cpus + h) for n, h in zip(free, held, strict=True)]
        for name in weights:  # every queue always has work waiting
            while sum(1 for j in queued.values() if j.queue == name) < backlog:
                counter += 1
                job_id = f"{name}-{counter}"
                queued[job_id] = QueuedJob(job_id, 0, now, Demand(rng.choice((1, 2, 4)), 1.0), queue=name)
        started = time.perf_counter()
        decision = plan(list(queued.values()), free, total, now, running=[r for r, _, _ in running.values()],
                        queues=queues)
        plan_s.append(time.perf_counter() - started)
        for job_id in decision.start:
            job = queued.pop(job_id)
            after = take(job.demand, free)
            held = [b.cpus - a.cpus for b, a in zip(free, after, strict=True)]
            free = after
            placed = tuple(i for i, h in enumerate(held) for _ in range(round(h)))
            running[job_id] = (RunningJob(job_id, 0, job.demand, now, queue=job.queue, nodes=placed),
                               now + rng.uniform(120, 900), held)
        for job, _, held in running.values():
            used[job.queue] += sum(held) * tick_s
            if now >= end / 2:
                used_late[job.queue] += sum(held) * tick_s
        now += tick_s
    capacity = nodes * cpus_per_node * end
    return {"share": {q: u / sum(used.values()) for q, u in used.items()},
            "share_second_half": {q: u / sum(used_late.values()) for q, u in used_late.items()},
            "utilisation": sum(used.values()) / capacity, "ticks": len(plan_s),
            "plan_ms_p50": sorted(plan_s)[len(plan_s) // 2] * 1e3, "plan_ms_max": max(plan_s) * 1e3}


def fair_share(args) -> None:
    weights = {"a": 2.0, "b": 1.0}
    goal = weights["a"] / weights["b"]
    print("3. fair share: queues a (weight 2) and b (weight 1), equal priority, both always backlogged, "
          "1 simulated hour on 4 x 8 CPUs, 5 runs (seeds 0-4) of a different job mix. A simulation: "
          "control/scheduler.plan on a synthetic clock, every 5 s")
    ratios, plan_ms = [], []
    for seed in range(5):
        started = time.perf_counter()
        r = simulate_fair_share(weights, seed=seed)
        ratio = r["share"]["a"] / r["share"]["b"]
        ratios.append(ratio)
        plan_ms.append(r["plan_ms_p50"])
        print(f"   seed {seed}: a {r['share']['a']:.1%}  b {r['share']['b']:.1%}  ratio {ratio:.2f}:1  "
              f"(second half {r['share_second_half']['a'] / r['share_second_half']['b']:.2f}:1)  "
              f"cluster use {r['utilisation']:.1%}  {time.perf_counter() - started:.1f} s wall")
    mean = sum(ratios) / len(ratios)
    worst = max(ratios, key=lambda x: abs(x - goal))
    verdict = "within" if abs(worst - goal) <= 0.1 * goal else "OUTSIDE"
    print(f"   mean ratio {mean:.2f}:1, worst {worst:.2f}:1 ({verdict} 10 % of 2:1); "
          f"plan() per tick p50 {sorted(plan_ms)[len(plan_ms) // 2]:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, choices=(1, 2, 3), action="append",
                        help="run only these parts (repeatable); default all")
    parser.add_argument("--steps", type=int, default=500, help="part 2: steps of the job (0.05 s each)")
    parser.add_argument("--outage-s", type=float, default=20.0, help="part 2: how long the node is gone")
    args = parser.parse_args(argv)
    parts = args.part or [1, 2, 3]
    work = Path(tempfile.mkdtemp(prefix="trainctl-scheduling-"))
    if 1 in parts:
        _print_preemption(preemption(work / "p1"))
    if 2 in parts:
        _print_goodput(elastic_goodput(work / "p2", args.steps, args.outage_s), args.outage_s)
    if 3 in parts and callable(fair_share):
        fair_share(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
