"""The deepspeed and horovod strategies as jobs on a simulated 2-node Ray cluster: the GPT
example, one rank per node; a worker is SIGKILLed after the first checkpoint, the job
restarts from that strategy's own checkpoint and succeeds."""

from __future__ import annotations

import os
import signal

import pytest

from tests.cluster.test_jobs_cluster import _gpt_data
from tests.multiprocess.test_strategies_plugins import _require

from ..helpers import job_spec, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
MODEL = {"layers": 2, "heads": 4, "dim": 64, "steps": 20, "checkpoint_every": 10, "hold_at": 10}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return _gpt_data(tmp_path_factory.mktemp("gpt"), 100_000)


@pytest.mark.parametrize("strategy, module, files", [
    ({"name": "deepspeed", "options": {"pipeline_stages": 2, "microbatches": 4}}, "deepspeed",
     ["deepspeed/state/layer_00-model_states.pt", "deepspeed/state/layer_03-model_states.pt",
      "tensors/.metadata"]),
    ({"name": "deepspeed", "options": {"zero_stage": 2}}, "deepspeed",
     ["deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
      "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", "deepspeed/state/mp_rank_00_model_states.pt"]),
    ({"name": "horovod"}, "horovod.torch", ["tensors/.metadata", "extra.pt"]),
], ids=["deepspeed-pipeline", "deepspeed-zero2", "horovod"])
def test_worker_killed_mid_run_resumes_from_the_strategys_checkpoint(client, gpt, tmp_path, strategy, module, files):
    _require(module)
    gate = tmp_path / "gate"
    spec = job_spec(f"gpt-{strategy['name']}-kill", "tests.jobs.plugin_fns:gpt_gated", tmp_path,
                    strategy=strategy, config={**MODEL, "gate": str(gate)}, **gpt)
    job_id = client.submit(spec)
    job = wait_for(lambda: (j := client.get(job_id))["checkpoint"] and j["checkpoint"]["step"] == 10 and j,
                   180, what="the step-10 checkpoint")
    checkpoint = job["checkpoint"]["path"]
    for name in files:  # the strategy's own format, committed by trainctl
        assert os.path.exists(os.path.join(checkpoint, name)), name
    victim = next(p for p in job["placement"] if p["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    job = client.wait(job_id, timeout_s=240)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert [r["kind"] for r in job["restarts"]] == ["worker_died"]
    assert job["restarts"][0]["from_checkpoint"] is not None
    assert job["metrics"]["step"] == 20
    assert job["metrics"]["loss"] < 3.6  # kept learning from where it was (it starts at ~5.6)
    text, _ = client.read_logs(job_id)
    assert "restored checkpoint 1 (step 10)" in text
    assert not gate.exists()
