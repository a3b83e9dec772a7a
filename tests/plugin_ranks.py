"""The GPT example's training step under the deepspeed and horovod strategies on real gloo
ranks (spawned processes, no Ray), as tests/gpt_ranks.py does for the built-in strategies,
with strategy options; each rank also checkpoints and, when asked, resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from examples.gpt.model import token_loss
from strategies import WorkerEnv, get_strategy_class
from strategies.base import local_state_bytes

from .gpt_ranks import STEPS, dataset, exit_like_a_worker, make_model


def run_rank(rank: int, world: int, port: int, strategy_name: str, options: dict, data: str, out: str,
             steps: int = STEPS, resume: str | None = None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    env = WorkerEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                    master_addr="127.0.0.1", master_port=port)
    cls = get_strategy_class(strategy_name)
    strategy = cls(cls.parse_options(options))
    strategy.setup(env)
    ds = dataset(data, strategy.data_parallel_rank, strategy.data_parallel_size)
    model = make_model(ds.manifest.schema.field("tokens").type.list_size - 1, meta=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    skip = 0
    if resume:
        state = strategy.load_checkpoint(Path(resume), {"model": model, "optimizer": optimizer})
        skip = state["step"]
    losses = []
    it = iter(ds)
    for _ in range(skip):
        next(it)
    for _ in range(steps):
        tokens = next(it)["tokens"].long()
        loss = strategy.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
        losses.append(strategy.all_reduce(loss.clone(), "mean").item())
    ckpt = Path(out) / "ckpt"
    if rank == 0:
        ckpt.mkdir(exist_ok=True)
    strategy.barrier()
    strategy.save_checkpoint({"model": model, "optimizer": optimizer, "step": skip + steps}, ckpt)
    strategy.barrier()
    held = (strategy.local_state_bytes() if hasattr(strategy, "local_state_bytes")
            else {"params": local_state_bytes(model), "total": local_state_bytes(model, optimizer)})
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "bytes": held}))
    strategy.teardown()
    exit_like_a_worker()
