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

    # no dashboard: nothing here uses it, and it costs a second and a busy process per cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def client(ray_cluster):
    """The Python API's client on the module's cluster (its controller is created on first use)."""
    from orchestrator.client.api import Client

    return Client(ray_cluster.address)


@pytest.fixture
def tiny_storage(tmp_path):
    """A 2 MB tmpfs for checkpoint storage that fills up (root's mount; skipped where not permitted)."""
    import subprocess

    mount = tmp_path / "runs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 for this module (Debian's package, see tests/postgres_server.py)."""
    from .postgres_server import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; `make setup` does)")
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_uri():
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend) for this module."""
    from .mlflow_server import mlflow_bin, mlflow_server

    if mlflow_bin() is None:
        pytest.skip("mlflow is not installed (pip install mlflow; `make setup` does)")
    import mlflow.tracking  # noqa: F401  once, here: not in a test thread and a sink's at the same time

    with mlflow_server(timeout_s=300) as uri:
        yield uri


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test sees the user's ~/.trainctl (a `cluster up` head recorded there)."""
    monkeypatch.setenv("TRAINCTL_HOME", str(tmp_path / "trainctl-home"))
