"""End to end on a simulated 2-node Ray cluster: placement, queueing, cancel, recovery."""

from __future__ import annotations

import os
import signal

import pytest
import ray

from orchestrator.client.api import Client

from ..helpers import job_spec, pid_alive, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _state(client, job_id):
    return client.get(job_id)["state"]


def _gated(tmp_path, name, **overrides):
    gate = tmp_path / f"{name}.gate"
    spec = job_spec(name, "tests.jobs.train_fns:gated", tmp_path,
                    config={"gate": str(gate), "epochs": 3}, **overrides)
    return spec, gate


def test_spread_job_puts_one_rank_on_each_node(client, ray_cluster, tmp_path):
    spec = job_spec("spread", "tests.jobs.train_fns:gated", tmp_path, config={"epochs": 2})
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "SUCCEEDED", job.get("error")
    placement = sorted(job["placement"], key=lambda p: p["rank"])
    assert [p["rank"] for p in placement] == [0, 1]
    assert placement[0]["node_id"] != placement[1]["node_id"]
    assert {p["node_rank"] for p in placement} == {0, 1}
    assert job["metrics"]["epoch"] == 1
    assert job["checkpoint"]["step"] == 10
    text, _ = client.read_logs(job["id"])
    assert "[rank 0] finished epoch 1" in text and "[rank 1] finished epoch 1" in text


def test_two_jobs_that_cannot_both_fit_run_one_after_the_other(client, tmp_path):
    big = {"resources": {"workers": 2, "cpus_per_worker": 2, "placement": "spread"}}
    first_spec, gate = _gated(tmp_path, "first", **big)
    second_spec = job_spec("second", "tests.jobs.train_fns:gated", tmp_path, config={"epochs": 1}, **big)
    first = client.submit(first_spec)
    wait_for(lambda: _state(client, first) == "RUNNING", 90, what="first job running")
    second = client.submit(second_spec)
    queued = wait_for(lambda: (j := client.get(second))["queue_reason"] and j, 30, what="a queue reason")
    assert queued["state"] == "QUEUED"
    assert "waiting for resources" in queued["queue_reason"]
    gate.touch()
    first_job = client.wait(first, timeout_s=120)
    second_job = client.wait(second, timeout_s=120)
    assert first_job["state"] == second_job["state"] == "SUCCEEDED"
    assert second_job["started_at"] >= first_job["ended_at"] - 1.0  # admitted only after the first freed its gang


def test_jobs_that_fit_together_run_at_the_same_time(client, tmp_path):
    a_spec, a_gate = _gated(tmp_path, "together-a")
    b_spec, b_gate = _gated(tmp_path, "together-b")
    a, b = client.submit(a_spec), client.submit(b_spec)
    wait_for(lambda: _state(client, a) == _state(client, b) == "RUNNING", 120, what="both running")
    a_gate.touch()
    b_gate.touch()
    assert client.wait(a, timeout_s=120)["state"] == client.wait(b, timeout_s=120)["state"] == "SUCCEEDED"


def test_higher_priority_job_is_admitted_first(client, tmp_path):
    big = {"resources": {"workers": 2, "cpus_per_worker": 2, "placement": "spread"}}
    blocker, gate = _gated(tmp_path, "blocker", **big)
    blocker_id = client.submit(blocker)
    wait_for(lambda: _state(client, blocker_id) == "RUNNING", 90, what="blocker running")
    low = client.submit(job_spec("low", "tests.jobs.train_fns:gated", tmp_path, config={"epochs": 1}, **big))
    high = client.submit(job_spec("high", "tests.jobs.train_fns:gated", tmp_path, config={"epochs": 1}, **big),
                         priority=10)
    gate.touch()
    low_job, high_job = client.wait(low, timeout_s=180), client.wait(high, timeout_s=180)
    assert low_job["state"] == high_job["state"] == "SUCCEEDED"
    assert high_job["started_at"] < low_job["started_at"]  # submitted later, admitted first


def test_job_larger_than_the_cluster_stays_queued_with_a_reason(client, tmp_path):
    spec = job_spec("huge", "tests.jobs.train_fns:gated", tmp_path,
                    resources={"workers": 5, "cpus_per_worker": 1})
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["queue_reason"] and j, 30, what="a queue reason")
    assert job["state"] == "QUEUED" and "more than the whole cluster" in job["queue_reason"]
    assert client.cancel(job_id)["state"] == "CANCELLED"


def test_unschedulable_fail_policy_fails_the_job(client, tmp_path):
    spec = job_spec("huge-fail", "tests.jobs.train_fns:gated", tmp_path,
                    resources={"workers": 5}, failure={"unschedulable": "fail"})
    job = client.wait(client.submit(spec), timeout_s=30)
    assert job["state"] == "FAILED" and "unschedulable" in job["error"]


def test_cancel_frees_the_placement_group_and_actors(client, ray_cluster, tmp_path):
    spec, _gate = _gated(tmp_path, "cancelme")
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["state"] == "RUNNING" and j, 90, what="job running")
    pids = [p["pid"] for p in job["placement"]]
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    job = client.cancel(job_id)
    assert job["state"] == "CANCELLED"
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 30, what="worker processes gone")
    from ray.util.placement_group import placement_group_table

    states = [pg["state"] for pg in placement_group_table().values() if job_id in pg["name"]]
    assert states and all(s == "REMOVED" for s in states)
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 4, 30, what="all 4 CPUs free again")


def test_worker_killed_mid_run_restarts_from_checkpoint(client, tmp_path):
    spec, gate = _gated(tmp_path, "killme")
    job_id = client.submit(spec)
    # hold_after=1: the job sits after epoch 1's checkpoint until the gate opens
    job = wait_for(lambda: (j := client.get(job_id))["checkpoint"] and j["checkpoint"]["step"] == 10 and j,
                   120, what="epoch 1 checkpoint")
    victim = next(p for p in job["placement"] if p["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    job = client.wait(job_id, timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert len(job["restarts"]) == 1
    restart = job["restarts"][0]
    assert restart["kind"] == "worker_died" and "rank 1" in restart["cause"]
    assert restart["from_checkpoint"] is not None
    assert job["metrics"]["start_epoch"] == 2  # resumed after epoch 1, not from scratch
    assert [h["state"] for h in job["history"]].count("RUNNING") == 2
    assert not gate.exists()


def test_controller_killed_mid_run_loses_no_job(client, ray_cluster, tmp_path):
    from orchestrator.control.controller import CONTROLLER_NAME

    spec, gate = _gated(tmp_path, "survivor")
    done = client.wait(client.submit(job_spec("done-before", "tests.jobs.train_fns:gated", tmp_path,
                                              config={"epochs": 1})), timeout_s=120)
    job_id = client.submit(spec)
    wait_for(lambda: _state(client, job_id) == "RUNNING", 90, what="job running")
    old_pid = ray.get(client.controller.ping.remote())["pid"]
    ray.kill(ray.get_actor(CONTROLLER_NAME), no_restart=True)

    fresh = Client(ray_cluster.address)  # recreates the controller from the SQLite table
    assert ray.get(fresh.controller.ping.remote())["pid"] != old_pid
    jobs = {j["id"]: j for j in fresh.list()}
    assert jobs[done["id"]]["state"] == "SUCCEEDED"
    assert jobs[job_id]["state"] == "RUNNING"
    gate.touch()
    job = fresh.wait(job_id, timeout_s=120)
    assert job["state"] == "SUCCEEDED" and job["restarts"] == []  # it kept running throughout


def test_training_error_restarts_then_fails_with_the_reason(client, tmp_path):
    spec = job_spec("flaky", "tests.jobs.train_fns:always_fails", tmp_path, failure={"max_restarts": 1})
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "FAILED"
    assert len(job["restarts"]) == 1
    assert "ValueError: boom on attempt 1" in job["error"]


def test_non_retryable_error_fails_without_restart(client, tmp_path):
    spec = job_spec("fatal", "tests.jobs.train_fns:fails_fatally", tmp_path)
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "FAILED" and job["restarts"] == []
    assert "bad data in shard 3" in job["error"]


def test_data_job_killed_mid_epoch_resumes_at_the_right_sample(client, tmp_path):
    from orchestrator.data.loader import ShardedDataset

    from ..datasets import write_dataset

    dataset = write_dataset(tmp_path / "ds", [700, 13, 287])  # 1000 rows, uneven shards
    out = tmp_path / "seen"
    out.mkdir()
    data = {"train": {"path": str(dataset), "batch_size": 20, "shuffle": True, "seed": 4}}
    spec = job_spec("data-kill", "tests.jobs.train_fns:data_gated", tmp_path, data=data,
                    config={"gate": str(tmp_path / "gate"), "out": str(out), "every": 2, "hold_at": 4})
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["checkpoint"] and j["checkpoint"]["index"] == 2 and j,
                   120, what="the checkpoint after batch 4")
    victim = next(p for p in job["placement"] if p["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    job = client.wait(job_id, timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert [r["kind"] for r in job["restarts"]] == ["worker_died"]

    for rank in (0, 1):
        first = (out / f"rank{rank}-attempt0.txt").read_text()
        before_kill = first[:first.rindex("checkpoint\n")].replace("checkpoint\n", "").split()
        after = (out / f"rank{rank}-attempt1.txt").read_text().replace("checkpoint\n", "").split()
        expected = [i for b in ShardedDataset(str(dataset), batch_size=20, shuffle=True, seed=4,
                                              rank=rank, world_size=2) for i in b["id"].tolist()]
        assert len(before_kill) == 4 * 20
        assert [int(i) for i in before_kill + after] == expected  # no sample skipped or repeated


def test_corrupt_shard_mid_run_fails_the_job_with_the_file_named(client, tmp_path):
    from ..datasets import write_dataset

    dataset = write_dataset(tmp_path / "ds", [200, 200, 200])
    shard = dataset / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-20])  # torn: only readers that reach it notice
    out = tmp_path / "seen"
    out.mkdir()
    spec = job_spec("bad-shard", "tests.jobs.train_fns:data_gated", tmp_path,
                    data={"train": {"path": str(dataset), "batch_size": 20}}, config={"out": str(out)})
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "FAILED" and job["restarts"] == [], job["history"]  # bad data: no restart
    assert "shard-00002.arrow: corrupt shard" in job["error"]


def _gpt_data(tmp_path, chars: int) -> dict:
    """A small shard set of the GPT example's text; returns the spec's `data` part."""
    import pyarrow as pa

    from examples.gpt.data import corpus, sequences
    from orchestrator.data.writer import shard_dataset

    table = sequences(corpus(chars), seq=32)
    with pa.OSFile(str(tmp_path / "src.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    shard_dataset([str(tmp_path / "src.arrow")], str(tmp_path / "gpt"), rows_per_shard=1000)
    return {"data": {"train": {"path": str(tmp_path / "gpt"), "batch_size": 8, "shuffle": True}}}


def test_gpt_saved_under_fsdp_on_2_workers_resumes_under_ddp_on_1(client, tmp_path):
    common = _gpt_data(tmp_path, 200_000)
    model = {"layers": 2, "heads": 4, "dim": 64, "checkpoint_every": 10}
    first = client.wait(client.submit(job_spec(
        "gpt-fsdp", "examples.gpt.train:train", tmp_path, strategy={"name": "fsdp"},
        config={**model, "steps": 20}, **common)), timeout_s=180)
    assert first["state"] == "SUCCEEDED", first.get("error")
    saved = first["checkpoint"]["path"]
    shards = sorted(p.name for p in (tmp_path / "runs" / first["id"]).glob("*/tensors/*.distcp"))
    assert len(shards) >= 2  # sharded: each FSDP rank wrote its own part

    second = client.wait(client.submit(job_spec(
        "gpt-ddp-1", "examples.gpt.train:train", tmp_path, strategy={"name": "ddp"},
        resources={"workers": 1}, config={**model, "steps": 30},
        checkpoint={"resume_from": saved}, **common)), timeout_s=180)
    assert second["state"] == "SUCCEEDED", second.get("error")
    assert second["metrics"]["step"] == 30
    assert second["metrics"]["loss"] < first["metrics"]["loss"] + 0.3
    text, _ = client.read_logs(second["id"])
    assert "restored checkpoint 2 (step 20)" in text


def _saved_then_resumed(client, tmp_path, first_strategy: dict, second_strategy: dict):
    """10 GPT steps under one strategy, then 5 more under another from its checkpoint."""
    common = _gpt_data(tmp_path, 100_000)
    model = {"layers": 2, "heads": 4, "dim": 64, "checkpoint_every": 10}
    first = client.wait(client.submit(job_spec(
        "gpt-first", "examples.gpt.train:train", tmp_path, strategy=first_strategy,
        config={**model, "steps": 10}, **common)), timeout_s=180)
    assert first["state"] == "SUCCEEDED", first.get("error")
    second = client.wait(client.submit(job_spec(
        "gpt-second", "examples.gpt.train:train", tmp_path, strategy=second_strategy,
        config={**model, "steps": 15}, checkpoint={"resume_from": first["checkpoint"]["path"]}, **common)),
        timeout_s=180)
    assert second["state"] == "SUCCEEDED", second.get("error")
    assert second["metrics"]["step"] == 15
    assert second["metrics"]["loss"] < first["metrics"]["loss"] + 0.3
    text, _ = client.read_logs(second["id"])
    assert "restored checkpoint 1 (step 10)" in text


def test_gpt_saved_under_tensor_parallel_resumes_under_fsdp(client, tmp_path):
    _saved_then_resumed(client, tmp_path, {"name": "tensor"}, {"name": "fsdp"})


def test_gpt_saved_under_ddp_resumes_under_a_pipeline(client, tmp_path):
    """Each pipeline stage loads only its own modules from the whole-model checkpoint."""
    _saved_then_resumed(client, tmp_path, {"name": "ddp"},
                        {"name": "pipeline", "options": {"schedule": "gpipe", "microbatches": 2}})


def test_a_strategy_that_cannot_set_up_fails_the_job_without_restarts(client, tmp_path):
    from ..datasets import write_dataset

    data = {"train": {"path": str(write_dataset(tmp_path / "ds", [64])), "batch_size": 8}}
    spec = job_spec("bad-plan", "tests.jobs.train_fns:data_gated", tmp_path, data=data,
                    strategy={"name": "tensor", "options": {"plan": "tests.multiprocess.test_strategies_gpt:bad_plan"}},
                    config={"out": str(tmp_path)})
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "FAILED" and job["restarts"] == []
    assert "names module 'blocks.0.attn.nope', which the model does not have" in job["error"]


def test_gpt_hybrid_dp2_tp2_on_4_workers_of_2_nodes_matches_the_reference(client, tmp_path):
    """2 data-parallel replicas, each a tensor-parallel pair on one node (colocated); the
    step-20 loss (mean over the ranks = the global batch's) equals one process's."""
    from ..gpt_ranks import reference_run

    common = _gpt_data(tmp_path, 200_000)
    job = client.wait(client.submit(job_spec(
        "gpt-hybrid", "examples.gpt.train:train", tmp_path,
        strategy={"name": "hybrid", "options": {"dp": 2, "tp": 2}},
        resources={"workers": 4, "cpus_per_worker": 1, "placement": "spread"},
        config={"layers": 2, "heads": 4, "dim": 64, "checkpoint_every": 10, "steps": 20}, **common)),
        timeout_s=240)
    assert job["state"] == "SUCCEEDED", job.get("error")
    node = {p["rank"]: p["node_id"] for p in job["placement"]}
    assert node[0] == node[1] and node[2] == node[3]  # each tensor-parallel pair on one node
    assert node[0] != node[2]  # spread: the replicas on different nodes
    losses, _, _ = reference_run(common["data"]["train"]["path"], replicas=2, steps=20)
    assert job["metrics"]["step"] == 20
    assert abs(job["metrics"]["loss"] - losses[-1]) < 1e-4, (job["metrics"]["loss"], losses[-1])



def test_a_job_that_normalises_its_batches_in_place_succeeds(client, tmp_path):
    """Unshuffled Arrow batches are views of the memory-mapped shards: changed in place on
    every rank of two nodes, the job neither crashes nor reads changed data the next epoch."""
    from ..datasets import write_dataset

    dataset = write_dataset(tmp_path / "ds", [300, 7, 253])  # 560 rows, record batches of 64
    out = tmp_path / "seen"
    out.mkdir()
    spec = job_spec("in-place", "tests.jobs.train_fns:normalises_in_place", tmp_path,
                    data={"train": {"path": str(dataset), "batch_size": 20}}, config={"out": str(out)})
    job = client.wait(client.submit(spec), timeout_s=120)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["restarts"] == []
    seen = [[int(i) for i in (out / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert seen[0] == 2 * list(range(280)) and seen[1] == 2 * list(range(280, 560))  # each share, twice


def test_a_job_runs_in_a_fresh_fork_of_the_nodes_zygote(client, tmp_path):
    """The warm start (cluster/rank_host.py): the rank is a fork of its node's zygote, in the
    job's working_dir with the job's env, and nothing of an earlier job's rank is left in it."""
    import json
    from pathlib import Path

    import psutil

    seen = []
    for name in ("warm-a", "warm-b"):
        out = tmp_path / f"{name}.json"
        spec = job_spec(name, "tests.jobs.warm_fns:probe", tmp_path, config={"out": str(out)},
                        env={"WARM_VAR": name}, resources={"workers": 1})
        job = client.wait(client.submit(spec), timeout_s=120)
        assert job["state"] == "SUCCEEDED", job.get("error")
        rank = json.loads(out.read_text())
        assert rank["pid"] == job["placement"][0]["pid"]
        assert "orchestrator.runtime.zygote" in " ".join(psutil.Process(rank["ppid"]).cmdline())
        assert rank["env"] == name
        cwd = Path(rank["cwd"])
        assert cwd.name.startswith("_ray_pkg_") and Path(rank["file"]) == cwd / "tests" / "jobs" / "warm_fns.py"
        seen.append(rank)
    assert [r["mark_before"] for r in seen] == [None, None]
