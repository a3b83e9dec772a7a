"""strategies/ddp.py with two real gloo ranks on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from strategies.base import WorkerEnv
from strategies.ddp import DDPStrategy

from ..gpt_ranks import exit_like_a_worker

pytestmark = pytest.mark.timeout(120)

WORLD_SIZE = 2
LOCAL_BATCH = 4
IN_FEATURES, OUT_FEATURES = 5, 3
JOIN_TIMEOUT_S = 90


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch; rank r takes rows [r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, IN_FEATURES, generator=gen)
    y = torch.randn(WORLD_SIZE * LOCAL_BATCH, OUT_FEATURES, generator=gen)
    return x, y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank. Runs in a spawned process; writes its findings to out_dir/rank{rank}.pt."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    out = Path(out_dir)
    env = WorkerEnv(
        rank=rank,
        world_size=WORLD_SIZE,
        local_rank=rank,
        local_world_size=WORLD_SIZE,
        master_addr="127.0.0.1",
        master_port=port,
    )
    strategy = DDPStrategy(DDPStrategy.parse_options({"backend": "gloo", "timeout_s": 60}))
    strategy.setup(env)
    result: dict = {}
    try:
        # different initial weights per rank: DDP must make them rank 0's
        torch.manual_seed(100 + rank)
        model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
        result["init_before_prepare"] = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model, optimizer = strategy.prepare(model, optimizer)
        result["wrapped"] = type(model).__name__
        result["init"] = {k: v.clone() for k, v in strategy.unwrap(model).state_dict().items()}

        # each rank feeds different data
        x, y = make_data()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        strategy.backward(loss)
        result["grads"] = {n: p.grad.clone() for n, p in strategy.unwrap(model).named_parameters()}

        # collectives
        t = torch.tensor([rank + 1.0, 10.0 * rank])
        result["sum"] = strategy.all_reduce(t.clone(), op="sum")
        result["mean"] = strategy.all_reduce(t.clone(), op="mean")
        result["max"] = strategy.all_reduce(t.clone(), op="max")
        result["min"] = strategy.all_reduce(t.clone(), op="min")
        result["broadcast0"] = strategy.broadcast(torch.tensor([7.0 + rank]), src=0)
        result["broadcast1"] = strategy.broadcast(torch.tensor([7.0 + rank]), src=1)
        # barrier: rank 0 writes a marker before it; rank 1 must see it after
        marker = out / "before_barrier"
        if rank == 0:
            marker.write_text("written by rank 0")
        strategy.barrier()
        result["marker_seen_after_barrier"] = marker.exists()

        optimizer.step()
        optimizer.zero_grad()
        # a second step so the momentum buffers hold something
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        strategy.backward(loss)
        optimizer.step()

        # checkpoints: one shared directory, written collectively
        shared = out / "ckpt"
        if rank == 0:
            shared.mkdir()
        strategy.barrier()
        state = {"model": model, "optimizer": optimizer, "step": 2}
        strategy.save_checkpoint(state, shared)
        strategy.barrier()
        result["saved"] = {k: v.clone() for k, v in strategy.unwrap(model).state_dict().items()}
        result["saved_momentum"] = [
            optimizer.state[p]["momentum_buffer"].clone()
            for p in strategy.unwrap(model).parameters()
        ]

        # wreck the live state, then restore it from the checkpoint on every rank
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(-5.0)
        for p in strategy.unwrap(model).parameters():
            optimizer.state[p]["momentum_buffer"].fill_(0.0)
        loaded = strategy.load_checkpoint(shared, into={"model": model, "optimizer": optimizer})
        result["loaded_step"] = loaded["step"]
        result["loaded_model_is_live"] = loaded["model"] is model
        result["restored"] = {k: v.clone() for k, v in strategy.unwrap(model).state_dict().items()}
        result["restored_momentum"] = [
            optimizer.state[p]["momentum_buffer"].clone()
            for p in strategy.unwrap(model).parameters()
        ]
        strategy.barrier()
    finally:
        strategy.teardown()
    torch.save(result, out / f"rank{rank}.pt")
    exit_like_a_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks once; returns (out_dir, [result of rank 0, result of rank 1])."""
    out = tmp_path_factory.mktemp("ddp")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    try:
        context = mp.start_processes(
            _rank_main,
            args=(free_port(), str(out)),
            nprocs=WORLD_SIZE,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    pytest.fail(f"the ranks did not finish within {JOIN_TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_model_is_wrapped_and_initial_weights_are_rank0s(ranks):
    _, (r0, r1) = ranks
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    # the ranks started from different weights...
    assert not torch.equal(r0["init_before_prepare"]["weight"], r1["init_before_prepare"]["weight"])
    # ...and DDP made them all rank 0's
    assert_same(r0["init"], r0["init_before_prepare"], atol=0)
    assert_same(r1["init"], r0["init_before_prepare"], atol=0)


def test_gradients_equal_across_ranks_and_to_single_process(ranks):
    _, (r0, r1) = ranks
    assert_same(r0["grads"], r1["grads"])

    torch.manual_seed(0)
    reference = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    reference.load_state_dict(r0["init"])
    x, y = make_data()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    assert_same(r0["grads"], expected)
    assert_same(r1["grads"], expected)

    # and the data really differed: rank 0's local gradient alone is not the global one
    local = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    local.load_state_dict(r0["init"])
    torch.nn.functional.mse_loss(local(x[:LOCAL_BATCH]), y[:LOCAL_BATCH]).backward()
    assert not torch.allclose(local.weight.grad, expected["weight"], atol=1e-4)


def test_all_reduce(ranks):
    _, results = ranks
    for r in results:
        torch.testing.assert_close(r["sum"], torch.tensor([3.0, 10.0]))
        torch.testing.assert_close(r["mean"], torch.tensor([1.5, 5.0]))
        torch.testing.assert_close(r["max"], torch.tensor([2.0, 10.0]))
        torch.testing.assert_close(r["min"], torch.tensor([1.0, 0.0]))


def test_broadcast_and_barrier(ranks):
    _, results = ranks
    for r in results:
        torch.testing.assert_close(r["broadcast0"], torch.tensor([7.0]))
        torch.testing.assert_close(r["broadcast1"], torch.tensor([8.0]))
        assert r["marker_seen_after_barrier"] is True


def test_checkpoint_is_a_dcp_checkpoint_plus_rank0_extras(ranks):
    import torch.distributed.checkpoint as dcp

    out, (r0, _) = ranks
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["extra.pt", "tensors"]
    assert torch.load(out / "ckpt" / "extra.pt", weights_only=True) == {"step": 2}
    keys = set(dcp.FileSystemReader(str(out / "ckpt" / "tensors")).read_metadata().state_dict_metadata)
    # parameters by name, without DDP's "module." prefix, so any layout can load them
    assert {"model.model.weight", "model.model.bias"} <= keys
    assert not any("module" in k for k in keys)
    assert any(k.startswith("optim.state.") for k in keys)


def test_load_checkpoint_restores_on_both_ranks(ranks):
    _, (r0, r1) = ranks
    assert_same(r0["saved"], r1["saved"])  # DDP kept the replicas in sync through two steps
    assert not torch.equal(r0["saved"]["weight"], r0["init"]["weight"])  # the steps did something
    for r in (r0, r1):
        assert r["loaded_step"] == 2
        assert r["loaded_model_is_live"] is True
        assert_same(r["restored"], r0["saved"], atol=0)
        for got, want in zip(r["restored_momentum"], r0["saved_momentum"], strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert got.abs().sum() > 0
