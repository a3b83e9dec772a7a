"""The digits and GPT examples, as they ship, run as trainctl jobs on a GPU (gpus_per_worker: 1)."""

from __future__ import annotations

import math

import pytest
import yaml

from ..helpers import REPO
from .common import finished

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _example(path: str, tmp_path, **changes) -> dict:
    """The example's YAML on one GPU worker, its outputs under tmp_path."""
    spec = yaml.safe_load((REPO / path).read_text())
    spec["working_dir"] = str(REPO)
    spec["resources"] = {**spec["resources"], "workers": 1, "gpus_per_worker": 1}
    spec["checkpoint"] = {**spec["checkpoint"], "storage": str(tmp_path / "runs")}
    spec["failure"] = {"max_restarts": 0}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


def test_the_digits_example_trains_on_a_gpu(client, digits_data, tmp_path):
    paths = dict(arg.split("=", 1) for arg in digits_data[1::2])  # data.train.path=...
    spec = _example("examples/digits/ddp.yaml", tmp_path, config={"epochs": 2},
                    post_training=None)  # the passes are a CPU matter, tested elsewhere
    for split in ("train", "eval"):
        spec["data"][split] = {**spec["data"][split], "path": paths[f"data.{split}.path"]}
    job = finished(client, client.submit(spec))
    assert job["metrics"]["accuracy"] > 0.8, job["metrics"]
    logs, _ = client.read_logs(job["id"])
    assert "held-out accuracy" in logs


def test_the_gpt_example_trains_on_a_gpu(client, gpt_data, tmp_path):
    spec = _example("examples/gpt/ddp.yaml", tmp_path, config={"steps": 60, "checkpoint_every": 30})
    spec["data"]["train"] = {**spec["data"]["train"], "path": gpt_data}
    job = finished(client, client.submit(spec))
    assert job["progress"]["step"] == 60 and math.isfinite(job["metrics"]["loss"])
    assert job["checkpoint"]["step"] == 60
    logs, _ = client.read_logs(job["id"])
    assert "trained 60 steps" in logs
