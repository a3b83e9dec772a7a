"""The post-training passes through the real CLI: spec errors (exit 2) and `trainctl compress`."""

from __future__ import annotations

import json

import pytest
import yaml

from ..compress_helpers import digits_data, digits_job, trained_checkpoint
from ..helpers import trainctl

pytestmark = pytest.mark.timeout(240)

PRUNE_AND_INT8 = [{"prune": {"method": "l1_unstructured", "amount": 0.5}}, {"quantize": {"method": "dynamic_int8"}}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress-cli")
    return {"root": root, "data": digits_data(root), "ckpt": trained_checkpoint(root, epochs=4)}


def _write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("post, message", [
    ({"passes": [{"distill": {"method": "x"}}]}, "post_training.passes.0: a pass is one of prune or quantize"),
    ({"passes": [{"quantize": {"method": "int3"}}]}, "post_training.passes.0.quantize.method: 'int3' is not one of dynamic_int8,"),
    ({"passes": [{"prune": {"method": "l1_unstructured", "amount": 1.5}}]},
     "post_training.passes.0.prune.amount: 1.5 is out of range; it must be greater than 0 and less than 1"),
    ({"passes": [{"prune": {"method": "l1_unstructured", "amount": 0}}]},
     "post_training.passes.0.prune.amount: 0 is out of range; it must be greater than 0 and less than 1"),
    ({"passes": [{"quantize": {"method": "dynamic_int8"}}], "gate": {"metric": "accuracy"}, "eval": {"split": "test"}},
     "post_training.gate.metric needs the eval split 'test'"),
    ({"passes": [{"quantize": {"method": "dynamic_int8"}}], "hooks": "examples.digits.data"},
     "post_training.hooks: module 'examples.digits.data' has no build_model(config)"),
])
def test_a_bad_post_training_spec_is_one_line_and_exit_2(work, tmp_path, post, message):
    job = digits_job(work["data"])
    job["post_training"] = post
    result = trainctl("run", _write(tmp_path / "job.yaml", job), timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_method_this_platform_cannot_run_is_exit_2(work, tmp_path):
    """A machine without torchao (simulated: an import of it fails) cannot run static_int8."""
    blocker = tmp_path / "block" / "torchao"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torchao is not installed here')\n")
    job = digits_job(work["data"], passes=[{"quantize": {"method": "static_int8"}}])
    result = trainctl("run", _write(tmp_path / "job.yaml", job), env={"PYTHONPATH": str(tmp_path / "block")},
                      timeout=120)
    assert result.returncode == 2, result.stderr
    assert "post_training.passes.0.quantize.method: static_int8" in result.stderr
    assert "pip install" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_compress_runs_the_passes_on_an_existing_checkpoint(work, tmp_path):
    job = digits_job(work["data"])
    del job["post_training"]
    passes = {"hooks": "examples.digits.hooks", "passes": PRUNE_AND_INT8,
              "gate": {"metric": "accuracy", "max_drop": 0.02}, "eval": {"latency_iters": 50}}
    out = tmp_path / "out"
    result = trainctl("compress", str(work["ckpt"]), "--passes", _write(tmp_path / "passes.yaml", passes),
                      "--job", _write(tmp_path / "job.yaml", job), "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "[post-training] dynamic_int8:" in result.stdout and "kept" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["pass"] for r in report["rows"]] == ["trained", "l1_unstructured(0.5)", "dynamic_int8"]
    assert (out / "report.md").exists() and (out / "report.png").exists()
    assert (out / "model" / "recipe.json").exists()
    assert report["rows"][0]["threads"] == 1


def test_compress_with_a_whole_job_spec_as_the_passes_file(work, tmp_path):
    job = digits_job(work["data"], passes=[{"quantize": {"method": "dynamic_int8"}}])
    result = trainctl("compress", str(work["ckpt"]), "--passes", _write(tmp_path / "job.yaml", job),
                      "--out", str(tmp_path / "out"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "report.json").exists()


def test_compress_errors_are_one_line_and_exit_2(work, tmp_path):
    passes = _write(tmp_path / "passes.yaml", {"passes": PRUNE_AND_INT8})
    no_job = trainctl("compress", str(work["ckpt"]), "--passes", passes)
    assert no_job.returncode == 2 and "--job JOB.yaml" in no_job.stderr
    not_ckpt = trainctl("compress", str(tmp_path), "--passes", passes)
    assert not_ckpt.returncode == 2 and "not a trainctl checkpoint" in not_ckpt.stderr
    bad = _write(tmp_path / "bad.yaml", {"passes": [{"prune": {"method": "l1_magic", "amount": 0.5}}]})
    job = digits_job(work["data"])
    del job["post_training"]
    result = trainctl("compress", str(work["ckpt"]), "--passes", bad, "--job", _write(tmp_path / "job.yaml", job))
    assert result.returncode == 2 and "post_training.passes.0.prune.method" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
