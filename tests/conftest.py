"""Shared fixtures. Every Ray node, the GCS and the drivers stay on 127.0.0.1."""

from __future__ import annotations

import os

# Must be set before `ray` is imported anywhere, or Ray advertises the outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Loopback-only test clusters: no Ray token auth, whether or not ~/.ray/auth_token exists.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_cluster():
    """A simulated 2-node cluster (2 CPUs each) shared by one test module; the test process is its driver."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test sees the user's ~/.trainctl (a `cluster up` head recorded there)."""
    monkeypatch.setenv("TRAINCTL_HOME", str(tmp_path / "trainctl-home"))
