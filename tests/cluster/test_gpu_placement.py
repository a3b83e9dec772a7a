"""Real Ray actors on nodes that declare GPUs they do not have (Ray hands out GPU ids as
resources; nothing here touches CUDA): the GPU variables each rank really gets, and where
a tensor-parallel job's ranks land.

Each node's raylet runs with CUDA_VISIBLE_DEVICES=0,1, as on a GPU machine: Ray 2.60
leaves that to actors that asked for no GPU (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from ..helpers import job_spec

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

GPU_NODE = {"num_cpus": 2, "num_gpus": 2, "env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}}


@pytest.fixture(scope="module")
def gpu_node_cluster():
    """Two simulated nodes with 2 CPUs and 2 (declared) GPUs each; the test process drives it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=GPU_NODE)
    cluster.add_node(**GPU_NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _seen_by_actor(env_vars: dict) -> dict:
    import ray

    os.environ.update(env_vars)  # what WorkerActor.run does before the rank's function
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def test_each_gpu_worker_gets_its_ray_gpu_at_local_rank(gpu_node_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.workers import WorkerGroup

    pg = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    group = WorkerGroup(pg, size=2, cpus=0.5, gpus=1)
    try:
        slots = asyncio.run(group.start())
        seen = ray.get([group.actors[s.worker_index].run.remote(group.env_by_rank[s.rank], _seen_by_actor, {})
                        for s in slots], timeout=60)
        for slot, env, actor in zip(slots, group.env_by_rank, seen, strict=True):
            assert env["TRAINCTL_DEVICE_INDEX"] == env["LOCAL_RANK"] == str(slot.local_rank)
            assert actor["visible"] == env["CUDA_VISIBLE_DEVICES"] == "0,1"
            # the GPU Ray gave this actor is the one at position LOCAL_RANK
            assert actor["visible"].split(",")[slot.local_rank] == actor["ray_gpu_ids"][0]
    finally:
        group.shutdown()
        remove_placement_group(pg)


def test_a_cpu_tensor_job_on_gpu_nodes_sees_no_gpu_and_keeps_its_ranks_on_one_node(gpu_node_cluster, tmp_path):
    """gpus_per_worker 0 on nodes whose GPUs Ray would leave visible: every rank sees none
    (DeepSpeed on its CPU accelerator); and the tensor strategy's group shares a node even
    under `placement: spread`, which would otherwise put one rank on each node."""
    from orchestrator.client.api import Client

    client = Client(gpu_node_cluster.address)
    spec = job_spec("cpu-on-gpu-nodes", "tests.jobs.gpu_fns:reports_devices", tmp_path,
                    strategy={"name": "tensor"}, config={"out": str(tmp_path)},
                    resources={"workers": 2, "cpus_per_worker": 1, "placement": "spread"})
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    nodes = {p["rank"]: p["node_id"] for p in job["placement"]}
    assert nodes[0] == nodes[1]
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["CUDA_VISIBLE_DEVICES"] == "" and seen["DS_ACCELERATOR"] == "cpu", seen
        assert seen["device"] == "cpu" and seen["TRAINCTL_USE_GPU"] is None
