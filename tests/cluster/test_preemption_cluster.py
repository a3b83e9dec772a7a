"""Preemption, elastic resizes and drain on a real 2-node cluster with gloo ranks (one cluster
for the module; the tests run in order: the elastic test swaps the worker node, the drain test
drains the new one last)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.drain import draining_nodes
from orchestrator.client.api import Client

from ..datasets import write_dataset
from ..helpers import job_spec, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def cluster(request):
    """The shared 2-node fixture, with a short grow cool-down for the controller it starts."""
    old = os.environ.get("TRAINCTL_GROW_COOLDOWN_S")
    os.environ["TRAINCTL_GROW_COOLDOWN_S"] = "3"  # passed to the controller this process creates
    try:
        yield request.getfixturevalue("ray_cluster")
    finally:
        if old is None:
            os.environ.pop("TRAINCTL_GROW_COOLDOWN_S", None)
        else:
            os.environ["TRAINCTL_GROW_COOLDOWN_S"] = old


def _lines(out: Path) -> list[tuple[tuple[int, int], int, int, list[int]]]:
    """Every rank's log lines: (generation, step, world size, sample ids)."""
    rows = []
    for path in sorted(out.glob("rank*.txt")):
        for line in path.read_text().splitlines():
            gen, step, world, *ids = line.split()
            attempt, resumed = gen.split(".")
            rows.append(((int(attempt), int(resumed)), int(step), int(world), [int(i) for i in ids]))
    return rows


def _steps_by_rank_file(out: Path) -> dict[str, list[int]]:
    return {p.name: [int(line.split()[1]) for line in p.read_text().splitlines()] for p in sorted(out.glob("rank*.txt"))}


def test_a_high_priority_job_preempts_a_low_one_which_resumes_and_redoes_no_step(cluster, tmp_path):
    client = Client(cluster.address)
    low_out, high_out = tmp_path / "low", tmp_path / "high"
    low_out.mkdir(), high_out.mkdir()
    low = client.submit(job_spec("low", "tests.jobs.preempt_fns:steady", tmp_path, priority=0,
                                 resources={"workers": 2, "cpus_per_worker": 2},
                                 checkpoint={"every_n_steps": 1000},  # only the just-in-time save
                                 preemption={"min_runtime_s": 0},
                                 config={"steps": 60, "step_s": 0.05, "out": str(low_out)}))
    wait_for(lambda: (client.get(low)["progress"].get("step") or 0) >= 10, 180, what="the low job at step 10")
    high = client.submit(job_spec("high", "tests.jobs.preempt_fns:steady", tmp_path, priority=10,
                                  resources={"workers": 1, "cpus_per_worker": 1},
                                  config={"steps": 10, "step_s": 0.05, "out": str(high_out)}))
    victim = wait_for(lambda: (j := client.get(low))["preemptions"] and j, 120, what="the preemption")
    assert victim["preemptions"][0]["by"] == high
    done_high, done_low = client.wait(high, timeout_s=240), client.wait(low, timeout_s=300)
    assert done_high["state"] == "SUCCEEDED" and done_low["state"] == "SUCCEEDED", done_low.get("error")
    states = [h["state"] for h in done_low["history"]]
    assert states[states.index("PREEMPTING"):states.index("PREEMPTING") + 3] == ["PREEMPTING", "QUEUED", "STARTING"]
    assert f"preempted by {high}" in [h["note"] for h in done_low["history"]]
    [p] = done_low["preemptions"]
    assert p["saved"] and p["step"] >= 10 and done_low["restarts"] == []  # not a failure
    # the high job was admitted before the victim came back, and ran on the capacity it freed
    assert done_high["history"][-1]["at"] < [h["at"] for h in done_low["history"] if h["state"] == "STARTING"][-1]
    for rank_file, steps in _steps_by_rank_file(low_out).items():
        assert steps == list(range(1, 61)), rank_file  # every step once: nothing redone, nothing skipped


@pytest.mark.timeout(900)  # a node loss is seen after gloo's connection reset and Ray's health checks
def test_an_elastic_job_shrinks_on_a_node_loss_and_grows_back_with_every_sample_once(cluster, tmp_path):
    """2 workers -> a node is lost -> 1 worker continues from the last checkpoint -> a node comes
    back -> the job grows to 2 at a just-in-time checkpoint (after the module's 3 s cool-down);
    every sample of the epoch is seen exactly once across both resizes."""
    client = Client(cluster.address)
    data = write_dataset(tmp_path / "data", [512] * 8)
    out = tmp_path / "out"
    out.mkdir()
    spec = job_spec("elastic", "tests.jobs.preempt_fns:steady", tmp_path,
                    resources={"workers": 2, "min_workers": 1, "cpus_per_worker": 2},
                    data={"train": {"path": str(data), "batch_size": 8, "shuffle": True, "seed": 1,
                                    "drop_last": False}},  # a resized epoch's last batch may be short
                    config={"steps": 100_000, "step_s": 0.1, "out": str(out), "data": True})
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["checkpoint"] and j["checkpoint"]["step"] >= 8 and j,
                   180, what="the elastic job's 8th checkpoint")
    worker = next(n for n in cluster.worker_nodes if n.node_id in {p["node_id"] for p in job["placement"]})
    cluster.remove_node(worker, allow_graceful=False)
    shrunk = wait_for(lambda: (j := client.get(job_id))["state"] == "RUNNING" and j["workers"] == 1
                      and j["metrics"].get("world_size") == 1 and j, 180, what="the shrink to 1 worker")
    assert len(shrunk["restarts"]) == 1  # node_lost, or its peer's gloo error seen first
    cluster.add_node(num_cpus=2)  # capacity comes back (the drain test that follows needs it too)
    grown = wait_for(lambda: (j := client.get(job_id))["state"] in ("RUNNING", "SUCCEEDED", "FAILED")
                     and j["workers"] == 2 and j, 240, what="the growth back to 2 workers")
    assert grown["state"] == "RUNNING", grown.get("error")
    done = client.wait(job_id, timeout_s=300)
    assert done["state"] == "SUCCEEDED", done.get("error")
    assert len(done["restarts"]) == 1 and done["workers"] == 2  # the growth is no failure
    [grow] = done["preemptions"]
    assert grow["reason"] == "grows to 2 workers" and grow["resize_to"] == 2 and grow["saved"], grow
    # sample by sample: for each step, the lines of the last group of ranks that ran it
    rows = _lines(out)
    last = {}
    for gen, step, world, ids in rows:
        if step not in last or gen > last[step][0]:
            last[step] = (gen, world, [])
        if gen == last[step][0]:
            last[step][2].extend(ids)
    seen = [i for step in sorted(last) for i in last[step][2]]
    assert sorted(seen) == list(range(4096)), "a sample repeated or skipped across the resizes"
    # ctx.world_size followed the size: 2, then 1 after the loss, then 2 again after the growth
    sizes = [last[step][1] for step in sorted(last)]
    assert [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w] == [2, 1, 2], sizes


def test_draining_a_node_moves_its_job_to_another_node(cluster, tmp_path):
    client = Client(cluster.address)
    out = tmp_path / "out"
    out.mkdir()
    job_id = client.submit(job_spec("drained", "tests.jobs.preempt_fns:steady", tmp_path,
                                    resources={"workers": 2, "cpus_per_worker": 1},
                                    # long enough (30 s) to outlast the two CLI calls below on a busy machine
                                    config={"steps": 600, "step_s": 0.05, "out": str(out)}))
    job = wait_for(lambda: (j := client.get(job_id))["state"] == "RUNNING" and (j["progress"].get("step") or 0) >= 5
                   and j, 180, what="the job at step 5")
    worker = next(n for n in cluster.worker_nodes if n.node_id in {p["node_id"] for p in job["placement"]})
    # the real CLI: a node id that is no alive node is one line, exit 2, and nothing is drained
    bad = trainctl("cluster", "drain", "ffff0000", "--address", cluster.address)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    [line] = [x for x in bad.stderr.splitlines() if x.strip()]
    assert line.startswith("trainctl: error: cluster drain: node 'ffff0000' is no alive node") and bad.stdout == ""
    assert client.get(job_id)["state"] == "RUNNING" and client.get(job_id)["preemptions"] == []
    assert draining_nodes() == {}  # Ray was not asked either
    done = trainctl("cluster", "drain", worker.node_id[:12], "--address", cluster.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"draining node {worker.node_ip_address} ({worker.node_id[:12]}); moving: {job_id}", done.stdout
    moved = wait_for(lambda: (j := client.get(job_id))["state"] == "RUNNING" and j["preemptions"] and j,
                     180, what="the job running again")
    assert {p["node_id"] for p in moved["placement"]} == {cluster.head_node.node_id}
    assert "drains" in moved["preemptions"][0]["reason"] and moved["preemptions"][0]["saved"]
    final = client.wait(job_id, timeout_s=240)
    assert final["state"] == "SUCCEEDED" and final["restarts"] == []
