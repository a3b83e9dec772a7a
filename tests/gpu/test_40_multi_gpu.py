"""Two or more GPUs: multi-rank nccl jobs (DDP, FSDP, tensor parallel) and device ordering
(each rank's CUDA device is its LOCAL_RANK, on a GPU of its own)."""

from __future__ import annotations

import pytest

from .common import finished, gpu_count, gpu_job, rank_results

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(gpu_count() < 2, reason="needs 2 or more GPUs")]

WORKERS = 2
_first_losses: dict[str, float] = {}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tensor"])
def test_two_ranks_train_over_nccl_each_on_its_own_gpu(strategy, client, gpt_data, tmp_path):
    spec = gpu_job(f"gpu2-{strategy}", tmp_path, gpt_data, workers=WORKERS, strategy=strategy,
                   config={"steps": 20})
    job = finished(client, client.submit(spec))
    results = rank_results(tmp_path, WORKERS)
    placement = {p["rank"]: p for p in job["placement"]}
    for r in results:
        assert r["finite"] and len(r["losses"]) == 20
        local_rank = int(r["local_rank_env"])
        assert local_rank == placement[r["rank"]]["local_rank"]
        # torchrun-style code (and DeepSpeed) take cuda:LOCAL_RANK for granted
        assert r["device"] == f"cuda:{local_rank}" and r["current_device"] == local_rank, r
        assert r["param_devices"] == [r["device"]]
    assert len({r["device_uuid"] for r in results}) == WORKERS, "two ranks share a GPU"
    # the loss is all-reduced over ranks: every rank saw the same numbers
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-5)
    _first_losses[strategy] = results[0]["losses"][0]
    if strategy == "fsdp" and "ddp" in _first_losses:
        # the same model, data and global batch: sharding does not change the first step's loss
        assert _first_losses["fsdp"] == pytest.approx(_first_losses["ddp"], rel=1e-3)
