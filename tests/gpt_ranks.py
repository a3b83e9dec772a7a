"""Runs the GPT example's training step on real gloo ranks (spawned processes, no Ray),
so strategies can be compared with a single-process reference on the same samples."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

from examples.gpt.model import GPT, GPTConfig, token_loss
from examples.gpt.model import lm_loss as loss_of  # noqa: F401  (the tests' reference loss)
from orchestrator.data.loader import ShardedDataset
from strategies import WorkerEnv, get_strategy_class
from strategies.base import local_state_bytes as local_bytes
from strategies.materialize import materialize

STEPS, BATCH, SEED = 20, 8, 0
MODEL = dict(layers=2, heads=4, dim=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_like_a_worker() -> None:
    """End a spawned rank the way trainctl's workers end (Ray kills them): without
    interpreter finalization. Finalizing with gloo and FSDP objects still alive has, rarely,
    aborted a rank whose results were already on disk ("terminate called without an
    active exception", 2 of about 8 fresh-clone CI runs); what is under test is done by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_model(seq: int, meta: bool = False) -> GPT:
    """The GPT example as its train() builds it: on the meta device, weights made by
    `materialize` (per-module seeds), so a strategy given the meta model (meta=True) and
    one process given the materialised one start from the same weights."""
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = GPT(GPTConfig(seq=seq, **MODEL))
    return model if meta else materialize(model, "cpu")


def dataset(path: str, rank: int, world: int) -> ShardedDataset:
    return ShardedDataset(path, batch_size=BATCH, shuffle=True, seed=SEED, rank=rank, world_size=world)



def run_rank(rank: int, world: int, port: int, strategy_name: str, data: str, out: str,
             options: dict | None = None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    env = WorkerEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                    master_addr="127.0.0.1", master_port=port)
    cls = get_strategy_class(strategy_name)
    strategy = cls(cls.parse_options(options or {}))
    strategy.setup(env)
    ds = dataset(data, strategy.data_parallel_rank, strategy.data_parallel_size)
    model = make_model(ds.manifest.schema.field("tokens").type.list_size - 1, meta=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    losses = []
    for step, batch in enumerate(ds):
        tokens = batch["tokens"].long()
        loss = strategy.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
        losses.append(strategy.all_reduce(loss.clone(), "mean").item())
        if step + 1 == STEPS:
            break
    ckpt = Path(out) / "ckpt"
    if rank == 0:
        ckpt.mkdir()
    strategy.barrier()
    strategy.save_checkpoint({"model": model, "optimizer": optimizer, "step": STEPS}, ckpt)
    strategy.barrier()
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    checksum = float(sum(p.double().sum() for p in full))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"checksum": checksum}))
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps({"losses": losses, "bytes": local_bytes(model, optimizer)}))
    strategy.teardown()
    exit_like_a_worker()


def reference_run(data: str, replicas: int, steps: int = STEPS):
    """One process trains on what `replicas` data-parallel replicas read together each step
    (their batches concatenated): the losses any layout of the same job must reproduce."""
    torch.set_num_threads(1)
    shares = [iter(dataset(data, r, replicas)) for r in range(replicas)]
    model = make_model(dataset(data, 0, 1).manifest.schema.field("tokens").type.list_size - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, torch.cat([next(s)["tokens"] for s in shares]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model, optimizer
