"""Training functions the GPU smoke suite runs as trainctl jobs (one rank per GPU).

Each writes what the tests check into `config.out`: losses, where the parameters live, a
checksum of the weights after restoring and after the last save, and the rank's device.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from examples.gpt.model import token_loss
from examples.gpt.train import build_model


def weights_abs_sum(model) -> float:
    """Sum of |w| over the whole model (sharded parameters gathered): equal before a save and
    after loading it, whatever the strategy (the parameters' order does not matter)."""
    total = 0.0
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(full.detach().double().abs().sum())
    return total


def train_gpt(ctx) -> None:
    """The GPT example's step on the GPU for `steps` steps (more after a resume), bf16 autocast
    when `autocast_bf16` (strategies with their own bf16 option set it there instead); a
    checkpoint at the last step. With `gate`, runs until that file exists (metrics tests)."""
    cfg = {"steps": 20, "lr": 3e-3, "layers": 2, "heads": 4, "dim": 128, **ctx.config}
    torch.manual_seed(0)
    data = ctx.dataset("train")
    seq = data.manifest.schema.field("tokens").type.list_size - 1
    model = build_model({**cfg, "seq": seq})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    model, optimizer = ctx.prepare(model, optimizer)
    restored = ctx.restore({"model": model, "optimizer": optimizer})
    result = {"rank": ctx.rank, "device": str(ctx.device), "restored_step": None, "restored_abs_sum": None,
              "local_rank_env": os.environ.get("LOCAL_RANK"),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "current_device": torch.cuda.current_device() if torch.cuda.is_available() else None}
    if restored is not None:
        result["restored_step"], result["restored_abs_sum"] = ctx.step, weights_abs_sum(model)
    if torch.cuda.is_available() and ctx.device.type == "cuda":
        result["device_uuid"] = str(torch.cuda.get_device_properties(ctx.device).uuid)
    last_step = ctx.step + cfg["steps"]
    gate = Path(cfg["gate"]) if cfg.get("gate") else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(cfg.get("autocast_bf16")))
    losses = []
    done = False
    while not done:
        for batch in data:
            tokens = batch["tokens"].long().to(ctx.device, non_blocking=True)
            with autocast:
                loss = ctx.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
            mean_loss = ctx.all_reduce(loss.detach().float().clone(), op="mean")  # timed by CUDA events
            done = (ctx.step + 1 >= last_step) if gate is None else gate.exists()
            ctx.report({"loss": mean_loss, "samples": len(tokens), "tokens": tokens[:, 1:].numel()},
                       checkpoint={"model": model, "optimizer": optimizer} if done and gate is None else None)
            losses.append(mean_loss)
            if done:
                break
    result["losses"] = [float(v) for v in losses]  # read once, at the end
    result["finite"] = all(math.isfinite(v) for v in result["losses"])
    result["param_devices"] = sorted({str(p.device) for p in model.parameters()})
    result["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    result["abs_sum"] = weights_abs_sum(model)  # the weights the last checkpoint holds
    result["step"] = ctx.step
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
