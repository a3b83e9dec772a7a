"""Sweeps end to end on a simulated 2-node Ray cluster: trials are real digits jobs in the queue,
the driver runs inside the real controller, the study lives in the job store's SQLite file."""

from __future__ import annotations

import json

import pytest

from orchestrator.sweep.api import checked, submit_sweep, wait_sweep

from ..helpers import REPO, digits_shards, job_spec, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    """The digits example as a tiny one-worker job (shards made once for the module)."""
    directory = tmp_path_factory.mktemp("sweep-data")
    args = digits_shards(directory)
    paths = dict(a.split("=", 1) for a in args[1::2])
    return {
        "name": "digits", "entrypoint": "examples.digits.train:train", "working_dir": str(REPO),
        "config": {"epochs": 1, "lr": 0.05, "hidden": 64, "seed": 0},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "data": {"train": {"path": paths["data.train.path"], "batch_size": 32, "shuffle": True},
                 "eval": {"path": paths["data.eval.path"], "batch_size": 512, "drop_last": False}},
        "checkpoint": {"storage": str(directory / "runs"), "keep": 1},
        "failure": {"max_restarts": 1},  # a supervisor lost under load (2 shared cores) is not the point here
    }


def _start(client, doc: dict) -> str:
    spec, base = checked(doc)
    return submit_sweep(client, spec, base)["id"]


def test_a_grid_of_six_digits_trials_all_succeed_with_a_best_trial(client, digits_base, ray_cluster, tmp_path):
    sweep_id = _start(client, {
        "name": "grid", "base": digits_base, "search": "grid", "max_concurrent": 4,
        "parameters": {"config.lr": {"choice": [0.02, 0.1]}, "config.hidden": {"choice": [16, 32, 64]}},
        "objective": {"metric": "accuracy", "mode": "max"},
        # once the trials ended: the passes on the best trial's checkpoint, as one more job
        "post_training": {"hooks": "examples.digits.hooks", "passes": [{"quantize": {"method": "dynamic_int8"}}],
                          "gate": {"metric": "accuracy", "max_drop": 0.05}, "eval": {"latency_iters": 20}}})
    status = wait_sweep(client, sweep_id, timeout_s=360)
    assert status["state"] == "SUCCEEDED", status["note"]
    trials = status["trials"]
    assert len(trials) == 6 and {t["state"] for t in trials} == {"SUCCEEDED"}, [t["error"] for t in trials]
    assert {(t["params"]["config.lr"], t["params"]["config.hidden"]) for t in trials} == \
        {(lr, h) for lr in (0.02, 0.1) for h in (16, 32, 64)}
    best = next(t for t in trials if t["number"] == status["best"])
    assert best["value"] == max(t["value"] for t in trials) and best["value"] > 0.5
    assert best["checkpoint"] and best["checkpoint"].startswith(digits_base["checkpoint"]["storage"])
    for t in trials:  # ordinary jobs, named after the sweep, with the trial's values in their spec
        job = client.get(t["job_id"])
        assert job["name"] == f"{sweep_id}-t{t['number']}"
        assert job["spec"]["config"]["hidden"] == t["params"]["config.hidden"]

    post = status["post_training"]  # the best trial's spec, trained no further, compressed
    assert post["state"] == "SUCCEEDED" and post["checkpoint"] == best["checkpoint"], post
    assert status["note"] == f"post-training kept {', '.join(post['report']['kept']) or 'no pass'}"
    post_job = client.get(post["job_id"])
    assert post_job["name"] == f"{sweep_id}-post" and post_job["spec"]["config"]["hidden"] == best["params"]["config.hidden"]
    assert [h["state"] for h in post_job["history"]][-2:] == ["POST_TRAINING", "SUCCEEDED"]
    report = json.loads(open(post["report"]["files"]["json"]).read())
    assert report["checkpoint"] == best["checkpoint"] and [r["pass"] for r in report["rows"]] == ["trained", "dynamic_int8"]

    chart = tmp_path / "grid.png"
    shown = trainctl("sweep", "status", "grid", "--address", ray_cluster.address, "--chart", str(chart))
    assert shown.returncode == 0, shown.stderr
    assert f"best: {best['name']}" in shown.stdout and "config.hidden" in shown.stdout
    assert f"post-training: job {post['job_id']} SUCCEEDED" in shown.stdout and post["report"]["report"] in shown.stdout
    assert chart.read_bytes()[:4] == b"\x89PNG"
    listed = trainctl("sweep", "list", "--json", "--address", ray_cluster.address)
    assert any(s["id"] == sweep_id and s["state"] == "SUCCEEDED" for s in json.loads(listed.stdout))


def test_asha_stops_a_bad_tpe_trial_early_and_frees_its_worker(client, digits_base):
    # TPE with seed 10 tries lr 0.05 first and then lr 1e-5 (checked offline); one trial at a
    # time, so the second meets the first at ASHA's first rung and is far behind it there
    sweep_id = _start(client, {
        "name": "asha", "base": digits_base, "search": "tpe", "trials": 2, "max_concurrent": 1, "seed": 10,
        # small batches: epochs long enough (~180 steps) that the controller's 0.5 s ticks see most
        "overrides": {"config.epochs": 12, "config.hidden": 32, "data.train.batch_size": 8},
        "parameters": {"config.lr": {"choice": [0.05, 0.00001]}},
        "objective": {"metric": "accuracy", "mode": "max"},
        "early_stopping": {"method": "asha", "unit": "epochs", "min_resource": 1, "reduction_factor": 2}})
    status = wait_sweep(client, sweep_id, timeout_s=300)
    assert status["state"] == "SUCCEEDED", status["note"]
    good, bad = sorted(status["trials"], key=lambda t: t["number"])
    assert good["params"]["config.lr"] == 0.05 and good["state"] == "SUCCEEDED"
    assert bad["params"]["config.lr"] == 0.00001 and bad["state"] == "STOPPED"
    full = good["total_steps"]
    assert good["steps"] == full
    assert bad["steps"] < full * 0.75, (bad["steps"], full)  # stopped well before the end
    job = client.get(bad["job_id"])
    assert job["state"] == "STOPPED" and "pruned by sweep" in job["history"][-1]["note"]
    assert status["best"] == good["number"]


def test_cancelling_a_sweep_cancels_its_running_trials_and_starts_no_more(client, ray_cluster, tmp_path):
    gate = tmp_path / "never"
    base = job_spec("held", "tests.jobs.train_fns:gated", tmp_path, config={"gate": str(gate), "epochs": 3},
                    resources={"workers": 1, "cpus_per_worker": 1})
    sweep_id = _start(client, {
        "name": "cancel-me", "base": base, "search": "random", "trials": 5, "max_concurrent": 2,
        "parameters": {"config.steps": {"int": [3, 6]}}, "objective": {"metric": "loss", "mode": "min"}})
    wait_for(lambda: [t for t in client._call("sweep_status", sweep_id)["trials"] if t["state"] == "RUNNING"][1:],
             120, what="two trials running")
    shown = trainctl("sweep", "cancel", "cancel-me", "--address", ray_cluster.address)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"{sweep_id} CANCELLED"
    status = client._call("sweep_status", sweep_id)
    assert status["state"] == "CANCELLED" and len(status["trials"]) == 2
    for t in status["trials"]:
        assert client.get(t["job_id"])["state"] == "CANCELLED"
    again = trainctl("sweep", "cancel", sweep_id, "--address", ray_cluster.address)
    assert again.returncode == 2 and "already ended (CANCELLED)" in again.stderr



def test_preempted_trials_go_back_to_the_queue_and_resume_without_new_trials(client, tmp_path):
    gate = tmp_path / "never"  # trials hold after their first epoch until preempted (then they resume)
    base = job_spec("held", "tests.jobs.train_fns:gated", tmp_path,
                    config={"gate": str(gate), "epochs": 3, "hold_after": 0},
                    resources={"workers": 1, "cpus_per_worker": 2}, preemption={"grace_s": 5, "min_runtime_s": 0})
    sweep_id = _start(client, {
        "name": "preempted", "base": base, "search": "random", "trials": 2, "max_concurrent": 2,
        "parameters": {"config.steps": {"int": [3, 6]}}, "objective": {"metric": "loss", "mode": "min"}})
    wait_for(lambda: [t for t in client._call("sweep_status", sweep_id)["trials"] if t["state"] == "RUNNING"][1:],
             120, what="both trials running (the whole cluster)")
    # the whole cluster, at a higher priority: both trials must make room
    urgent = client.submit(job_spec("urgent", "tests.jobs.train_fns:gated", tmp_path, config={"epochs": 1},
                                    resources={"workers": 2, "cpus_per_worker": 2}, priority=10))
    assert client.wait(urgent, timeout_s=180)["state"] == "SUCCEEDED"
    status = wait_sweep(client, sweep_id, timeout_s=240)
    assert status["state"] == "SUCCEEDED", status["note"]
    assert len(status["trials"]) == 2  # a preempted trial was still running: no replacement was asked
    histories = [[h["state"] for h in client.get(t["job_id"])["history"]] for t in status["trials"]]
    for h in histories:
        assert h[h.index("PREEMPTING") + 1] == "QUEUED" and h[-1] == "SUCCEEDED"
        assert h.count("RUNNING") >= 2  # resumed
