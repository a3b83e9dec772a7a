"""DeepSpeed under bf16 on 2 real gloo ranks (DeepSpeed runs bf16 on the CPU): float inputs
meet the engine's dtype, and the portable whole weights saved beside DeepSpeed's own files
are its fp32 master copy, so other strategies resume at full precision."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from strategies import WorkerEnv, get_strategy_class

from .. import gpt_ranks
from ..gpt_ranks import exit_like_a_worker, make_model

pytestmark = [pytest.mark.timeout(600)]  # the first DeepSpeed start may compile an op


@pytest.fixture(scope="module", autouse=True)
def _deepspeed():
    if os.environ.get("CI"):
        import deepspeed  # noqa: F401
    else:
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (make setup installs it)")


def _strategy(rank: int, world: int, port: int, options: dict):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cls = get_strategy_class("deepspeed")
    strategy = cls(cls.parse_options(options))
    strategy.setup(WorkerEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                             master_port=port))
    return strategy


def float_input_rank(rank: int, world: int, port: int, out: str) -> None:
    strategy = _strategy(rank, world, port, {"zero_stage": 1, "bf16": True})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = strategy.prepare(model, optimizer)
    x, y = torch.randn(32, 8), torch.randn(32, 1)  # fp32 features, as a data loader gives them
    losses = [strategy.train_step(model, optimizer, x, y, lambda out, t: (out.float() - t).pow(2).mean()).item()
              for _ in range(10)]
    direct = model(x)  # a loop of its own calls the engine directly
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "dtype": str(direct.dtype)}))
    strategy.teardown()
    exit_like_a_worker()


def test_float_inputs_are_cast_to_the_engines_bf16(tmp_path):
    mp.start_processes(float_input_rank, args=(2, gpt_ranks.free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["dtype"] == "torch.bfloat16"
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]


def portable_rank(rank: int, world: int, port: int, zero_stage: int, out: str) -> None:
    strategy = _strategy(rank, world, port, {"zero_stage": zero_stage, "bf16": True})
    model = make_model(32, meta=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(5):
        tokens = torch.randint(0, 256, (4, 33), generator=generator)
        strategy.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], gpt_ranks.token_loss)
    ckpt = Path(out) / "ckpt"
    if rank == 0:
        ckpt.mkdir()
    strategy.barrier()
    strategy.save_checkpoint({"model": model, "optimizer": optimizer, "step": 5}, ckpt)
    with strategy._whole_weights() as named:  # what the two copies hold right now, gathered
        copies = {name: {"master": strategy._master_weights(t).cpu(), "module": t.detach().cpu().clone()}
                  for name, t in named.items()}
    if rank == 0:
        torch.save(copies, Path(out) / "copies.pt")
    strategy.teardown()
    exit_like_a_worker()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_portable_weights_are_the_fp32_master_copy(tmp_path, zero_stage):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    mp.start_processes(portable_rank, args=(2, gpt_ranks.free_port(), zero_stage, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    dcp_to_torch_save(tmp_path / "ckpt" / "tensors", tmp_path / "portable.pt")
    portable = torch.load(tmp_path / "portable.pt")["model"]
    copies = torch.load(tmp_path / "copies.pt")
    assert set(portable) == {f"model.{name}" for name in copies}
    rounded_away = 0
    for name, copy in copies.items():
        saved = portable[f"model.{name}"]
        assert copy["module"].dtype == torch.bfloat16 and saved.dtype == torch.float32, name
        assert torch.equal(saved, copy["master"]), name
        rounded_away += int((saved != copy["module"].float()).sum())
    # the bf16 module is the master's rounding: most weights differ from it in the low bits
    assert rounded_away > 0.5 * sum(c["master"].numel() for c in copies.values())


def load_rank(rank: int, world: int, port: int, zero_stage: int, checkpoint: str, out: str) -> None:
    strategy = _strategy(rank, world, port, {"zero_stage": zero_stage, "bf16": True})
    model = make_model(32, meta=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    strategy.load_checkpoint(Path(checkpoint), {"model": model, "optimizer": optimizer})
    with strategy._whole_weights() as named:
        masters = {name: strategy._master_weights(t).cpu() for name, t in named.items()}
    if rank == 0:
        torch.save(masters, Path(out) / "masters.pt")
    strategy.teardown()
    exit_like_a_worker()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_bf16_job_started_from_fp32_weights_keeps_them_unrounded_as_its_master_copy(tmp_path, zero_stage):
    """Another strategy's fp32 checkpoint: the engine's module takes the bf16 rounding, its
    fp32 master copy (what the optimizer updates) the saved values themselves."""
    import torch.distributed.checkpoint as dcp

    trained = make_model(32)
    with torch.no_grad():  # weights off the bf16 grid, as training leaves them
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    saved = {name: p.detach().clone() for name, p in trained.named_parameters()}
    checkpoint = tmp_path / "ckpt"
    dcp.save({"model": {f"model.{n}": t for n, t in saved.items()}}, checkpoint_id=str(checkpoint / "tensors"),
             no_dist=True)
    torch.save({"step": 20}, checkpoint / "extra.pt")
    mp.start_processes(load_rank, args=(2, gpt_ranks.free_port(), zero_stage, str(checkpoint), str(tmp_path)),
                       nprocs=2, start_method="spawn", join=True)
    masters = torch.load(tmp_path / "masters.pt")
    assert masters.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(masters[name], value), name
