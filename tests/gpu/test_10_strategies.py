"""Each native strategy and DeepSpeed trains on one GPU as a trainctl job: 20 steps, bf16
where the strategy has it, finite losses, parameters on the device. Each job starts from
the checkpoint the previous one (another strategy) saved, so every strategy both loads a
foreign checkpoint and saves one the next strategy loads."""

from __future__ import annotations

import pytest

from .common import finished, gpu_job, rank_results

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

STEPS = 20
# (strategy, options, the job's config): bf16 through the strategy's own option where it has
# one, autocast in the training loop for DDP, fp32 for the tensor and pipeline layouts
CHAIN = [
    ("ddp", {}, {"autocast_bf16": True}),
    ("fsdp", {"mixed_precision": "bf16"}, {}),
    ("tensor", {}, {}),
    ("pipeline", {"microbatches": 2}, {}),
    ("hybrid", {"dp": 1, "tp": 1, "pp": 1}, {}),
    ("deepspeed", {"zero_stage": 1, "bf16": True}, {}),
    ("ddp", {}, {}),  # and DeepSpeed's checkpoint back into a native strategy
]
_saved: dict = {}  # the previous job's checkpoint and weights (the chain runs in order)


@pytest.mark.parametrize("position", range(len(CHAIN)), ids=[f"{i}-{c[0]}" for i, c in enumerate(CHAIN)])
def test_strategy_trains_on_the_gpu_and_continues_another_strategys_checkpoint(
        position, client, gpt_data, tmp_path):
    strategy, options, config = CHAIN[position]
    if position and not _saved:
        pytest.skip("the previous strategy in the chain did not save a checkpoint")
    resume = _saved.get("path")
    spec = gpu_job(f"gpu-{strategy}", tmp_path, gpt_data, strategy=strategy, options=options,
                   config={"steps": STEPS, **config})
    spec["checkpoint"]["resume_from"] = resume
    if position == 0:
        spec["env"] = {"NCCL_DEBUG": "INFO"}  # NCCL's own C++ output must reach the job log
    job = finished(client, client.submit(spec))
    (result,) = rank_results(tmp_path)
    if position == 0:
        logs, _ = client.read_logs(job["id"])
        assert "NCCL INFO" in logs, "NCCL's stderr did not reach trainctl logs:\n" + logs[-2000:]

    assert result["finite"] and len(result["losses"]) == STEPS, result["losses"]
    assert result["param_devices"] == ["cuda:0"], result["param_devices"]
    assert result["device"] == "cuda:0"
    if resume:
        # the other strategy's weights arrived whole (bf16 engines hold their weights in bf16)
        assert result["restored_step"] == _saved["step"]
        tolerance = 1e-2 if options.get("bf16") else 1e-4
        assert result["restored_abs_sum"] == pytest.approx(_saved["abs_sum"], rel=tolerance)
    assert job["checkpoint"] and job["checkpoint"]["step"] == result["step"]
    assert isinstance(job["metrics"]["loss"], float)  # status shows numbers, read off the device
    _saved.clear()
    _saved.update(path=job["checkpoint"]["path"], step=result["step"], abs_sum=result["abs_sum"])
