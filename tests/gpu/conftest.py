"""The GPU smoke suite's shared parts: skip without CUDA, one local Ray cluster with the
machine's GPUs, the example datasets. `make gpu-smoke` runs it (pytest -m gpu tests/gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..helpers import digits_shards, trainctl
from .common import cuda_missing, gpu_count

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Every GPU test of this directory is skipped, saying why, where there is no GPU."""
    why = cuda_missing()
    if why is None:
        return
    for item in items:
        if HERE in Path(str(item.path)).parents and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {why}"))


@pytest.fixture(scope="session")
def gpu_cluster():
    """A one-node Ray cluster holding every GPU of this machine; the test process drives it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": max(4, min(os.cpu_count() or 4, 16)), "num_gpus": gpu_count()})
    ray.init(address=cluster.address, namespace="trainctl", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def client(gpu_cluster):
    from orchestrator.client.api import Client

    with pytest.MonkeyPatch.context() as mp:  # read when the client creates the controller
        mp.setenv("TRAINCTL_METRICS_PORT", "0")
        mp.delenv("TRAINCTL_METRICS_HOST", raising=False)
        return Client(gpu_cluster.address)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-data")


@pytest.fixture(scope="session")
def gpt_data(data_dir) -> str:
    """The GPT example's training split, made by the real CLI."""
    out = data_dir / "gpt-train"
    if not (out / "manifest.json").exists():
        result = trainctl("data", "shard", "examples.gpt.data:gpt_train", "--out", str(out))
        assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="session")
def digits_data(data_dir) -> list[str]:
    """--set arguments pointing the digits example at its shards."""
    return digits_shards(data_dir)
