"""The same search space on the digits example swept fully and with ASHA (issue 17's benchmark).

    .venv/bin/python benchmarks/sweep.py [--epochs 15] [--concurrent 2] [--cpus 2] [--json OUT]
        [--min-resource 1] [--reduction-factor 3] [--only full|asha]

24 configurations (lr x width x batch size, a grid in a seeded random order) run as trials of
one worker each, first to the end, then with ASHA (by default rungs at 1, 3, 9 epochs, keep the
best third). Prints the best held-out accuracy of each, the trial-seconds each used (the time its
trials held their reservation: admission to end; split into launch, admission to first report,
and the rest), the per-trial launch under which ASHA would need 0.4x the compute, and the queue's
overhead per trial: from admission to the trial's first report (worker start, import, data
open), and the driver's latency from a trial's end to the submission of the one taking its slot. A local Ray cluster
on 127.0.0.1 with a throwaway job store is started first. Not run in CI: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The widths the issue names (and examples/digits/sweep.yaml searches): 2048 is the example's own
# model, whose epochs take long enough that stopping a trial early saves something.
SPACE = {"config.lr": {"choice": [0.003, 0.01, 0.03, 0.1]},
         "config.hidden": {"choice": [128, 512, 2048]},
         "data.train.batch_size": {"choice": [16, 64]}}


def sweep_doc(name: str, base: dict, concurrent: int, asha: bool, min_resource: int = 1,
              reduction_factor: int = 3) -> dict:
    doc = {"name": name, "base": base, "search": "grid", "seed": 0, "max_concurrent": concurrent,
           "parameters": SPACE, "objective": {"metric": "accuracy", "mode": "max"}}
    if asha:
        doc["early_stopping"] = {"method": "asha", "unit": "epochs", "min_resource": min_resource,
                                 "reduction_factor": reduction_factor}
    return doc


def _entered(job: dict, state: str) -> float | None:
    return next((h["at"] for h in job["history"] if h["state"] == state), None)


def measure(client, status: dict) -> dict:
    jobs = [client.get(t["job_id"]) for t in status["trials"] if t["job_id"]]
    held = [j["ended_at"] - j["started_at"] for j in jobs if j.get("started_at") and j.get("ended_at")]
    launch = [j["progress"]["first_report_at"] - j["started_at"] for j in jobs
              if j.get("started_at") and (j.get("progress") or {}).get("first_report_at")]
    training = [j["ended_at"] - j["progress"]["first_report_at"] for j in jobs
                if j.get("ended_at") and (j.get("progress") or {}).get("first_report_at")]
    ends = sorted(j["ended_at"] for j in jobs if j.get("ended_at"))
    latency = []
    for j in jobs:  # a trial submitted after another ended: how long its slot stood empty
        before = [e for e in ends if e <= j["submitted_at"]]
        if before:
            latency.append(j["submitted_at"] - before[-1])
    best = next(t for t in status["trials"] if t["number"] == status["best"])
    counts: dict[str, int] = {}
    for t in status["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {
        "state": status["state"], "trials": len(status["trials"]), "by_state": counts,
        "best_accuracy": best["value"], "best_params": best["params"],
        "trial_seconds": sum(held),
        # of which the trials' launches (admission to first report: worker start, imports, data open)
        "launch_seconds": sum(launch),
        "training_seconds": sum(training),  # the rest: first report to end (training, evaluation, stopping)
        "full_trials_run": sum(t["steps"] / t["total_steps"] for t in status["trials"] if t.get("total_steps")),
        "launch_s_p50": statistics.median(launch) if launch else None,
        "driver_latency_s_p50": statistics.median(latency) if latency else None,
        "wall_s": (status["ended_at"] or time.time()) - status["created_at"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15, help="a full trial's epochs (the example's 15)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (max_concurrent)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray node")
    p.add_argument("--only", choices=["full", "asha"], help="run one of the two sweeps")
    p.add_argument("--min-resource", type=int, default=1, help="ASHA's first rung, in epochs")
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps the best 1/this at each rung")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.client.api import Client
    from orchestrator.sweep.api import checked, submit_sweep, wait_sweep
    from tests.helpers import digits_shards

    work = Path(tempfile.mkdtemp(prefix="trainctl-sweep-bench-"))
    os.environ["TRAINCTL_STATE"] = str(work / "state")  # the controller's store: thrown away after
    data = dict(a.split("=", 1) for a in digits_shards(work)[1::2])
    base = {"name": "digits", "entrypoint": "examples.digits.train:train", "working_dir": str(ROOT),
            "config": {"epochs": args.epochs, "seed": 0},
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "data": {"train": {"path": data["data.train.path"], "shuffle": True},
                     "eval": {"path": data["data.eval.path"], "batch_size": 512, "drop_last": False}},
            "checkpoint": {"storage": str(work / "runs"), "keep": 1}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus})
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    results = {"epochs": args.epochs, "concurrent": args.concurrent, "configurations": 24,
               "asha_rungs": {"min_resource": args.min_resource, "reduction_factor": args.reduction_factor}}
    try:
        client = Client(cluster.address)
        for kind in ("full", "asha"):
            if args.only and args.only != kind:
                continue
            spec, resolved = checked(sweep_doc(f"bench-{kind}", base, args.concurrent, kind == "asha",
                                               args.min_resource, args.reduction_factor))
            sweep_id = submit_sweep(client, spec, resolved)["id"]
            status = wait_sweep(client, sweep_id, poll_s=2.0)
            results[kind] = measure(client, status)
            print(json.dumps({kind: results[kind]}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "full" in results and "asha" in results:
        full, asha = results["full"], results["asha"]
        results["accuracy_gap_points"] = 100 * (full["best_accuracy"] - asha["best_accuracy"])
        results["compute_ratio"] = asha["trial_seconds"] / full["trial_seconds"]
        results["training_ratio"] = asha["training_seconds"] / full["training_seconds"]
        # the launch time per trial under which ASHA's trial-seconds would be 0.4x the full sweep's,
        # at these training times: 24 launches in both, (24 L + T_asha) / (24 L + T_full) <= 0.4
        trials = full["trials"]
        results["launch_s_for_0.4x"] = max(0.0, (0.4 * full["training_seconds"] - asha["training_seconds"])
                                            / (0.6 * trials))
        print(f"full: best {full['best_accuracy']:.4f} in {full['trial_seconds']:.0f} trial-s; "
              f"asha: best {asha['best_accuracy']:.4f} in {asha['trial_seconds']:.0f} trial-s "
              f"({results['compute_ratio']:.2f}x the compute, {results['accuracy_gap_points']:.2f} points behind; "
              f"goal: within 0.5 points for at most 0.4x)")
        print(f"of which launch (admission to first report): full {full['launch_seconds']:.0f} s, asha "
              f"{asha['launch_seconds']:.0f} s; the rest {results['training_ratio']:.2f}x; 0.4x needs a launch of "
              f"at most {results['launch_s_for_0.4x']:.1f} s per trial (p50 now {asha['launch_s_p50']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
