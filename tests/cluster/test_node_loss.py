"""A whole node lost mid-run: the job re-reserves its gang elsewhere and resumes from the checkpoint."""

from __future__ import annotations

import pytest

from orchestrator.client.api import Client

from ..helpers import job_spec, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_node_lost_mid_run_restarts_on_the_remaining_node(ray_cluster, tmp_path):
    cluster = ray_cluster  # this module's own 2-node cluster (conftest): losing a node is fine here
    client = Client(cluster.address)
    gate = tmp_path / "gate"
    spec = job_spec("nodeloss", "tests.jobs.train_fns:gated", tmp_path,
                    config={"gate": str(gate), "epochs": 3})
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["checkpoint"] and j["checkpoint"]["step"] == 10 and j,
                   120, what="epoch 1 checkpoint")
    placement = {p["rank"]: p for p in job["placement"]}
    assert placement[0]["node_id"] != placement[1]["node_id"]  # spread over both nodes
    lost = next(n for n in cluster.worker_nodes if n.node_id in (placement[0]["node_id"], placement[1]["node_id"]))
    cluster.remove_node(lost, allow_graceful=False)

    job = client.wait(job_id, timeout_s=240)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert [r["kind"] for r in job["restarts"]] == ["node_lost"], job["restarts"]
    assert job["restarts"][0]["from_checkpoint"] is not None
    assert job["metrics"]["start_epoch"] == 2
    assert {p["node_id"] for p in job["placement"]} == {cluster.head_node.node_id}
