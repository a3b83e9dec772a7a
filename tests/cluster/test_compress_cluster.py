"""A job with post_training, end to end on a simulated 2-node Ray cluster."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.client.render import print_status

from ..compress_helpers import digits_data
from ..helpers import job_spec

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def _spec(tmp_path, name, passes, **post):
    data = digits_data(tmp_path)
    return job_spec(
        name, "examples.digits.train:train", tmp_path, config={"epochs": 2, "hidden": 64},
        data={"train": {"path": data["train"], "batch_size": 32, "shuffle": True},
              "eval": {"path": data["eval"], "batch_size": 512, "drop_last": False}},
        post_training={"hooks": "examples.digits.hooks", "passes": passes,
                       "gate": {"metric": "accuracy", "max_drop": 0.02}, "eval": {"latency_iters": 50}, **post},
    )


def test_a_job_with_post_training_succeeds_on_two_nodes(client, tmp_path):
    passes = [{"prune": {"method": "l1_structured", "amount": 0.3, "finetune": {"steps": 20}}},
              {"quantize": {"method": "dynamic_int8"}}]
    job = client.wait(client.submit(_spec(tmp_path, "post-ok", passes)), timeout_s=240)
    assert job["state"] == "SUCCEEDED", job.get("error")
    states = [h["state"] for h in job["history"]]
    assert states[-3:] == ["RUNNING", "POST_TRAINING", "SUCCEEDED"]
    assert len({p["node_id"] for p in job["placement"]}) == 2
    pt = job["post_training"]
    report_dir = Path(job["checkpoint_root"]) / "post_training"
    assert pt["report"] == str(report_dir / "report.md")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["job"] == job["id"] and report["checkpoint"] == job["checkpoint"]["path"]
    assert [r["pass"] for r in report["rows"]] == ["trained", "l1_structured(0.3)", "dynamic_int8"]
    assert report["rows"][0]["threads"] == 1  # cpus_per_worker
    assert (report_dir / "model" / "recipe.json").exists() and (report_dir / "report.png").exists()
    out = io.StringIO()
    print_status(Console(file=out, width=300), job)
    assert f"report     {pt['report']}" in out.getvalue()
    text, _ = client.read_logs(job["id"])
    assert "[post-training] dynamic_int8:" in text


def test_a_failing_post_training_stage_fails_the_job_with_its_reason(client, tmp_path):
    # a wrong model_key is only found when the checkpoint is read, after training
    spec = _spec(tmp_path, "post-bad-key", [{"quantize": {"method": "dynamic_int8"}}], model_key="net")
    job = client.wait(client.submit(spec), timeout_s=240)
    assert job["state"] == "FAILED"
    assert [h["state"] for h in job["history"]][-2:] == ["POST_TRAINING", "FAILED"]
    assert job["error"].startswith("post_training failed") and "'net'" in job["error"], job["error"]
