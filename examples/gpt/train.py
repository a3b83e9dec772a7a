"""One training function for every strategy: only the job YAML chooses ddp, fsdp, ...

The loss reported is the mean over all ranks (one all-reduce per step), so it is the
loss of the global batch whatever the layout, and comparable across strategies.
"""

from __future__ import annotations

import torch

from .model import GPT, GPTConfig, token_loss

DEFAULTS = {"steps": 200, "lr": 3e-3, "seed": 0, "layers": 2, "heads": 4, "dim": 128, "seq": 64,
            "checkpoint_every": 50}


def build_model(config: dict) -> GPT:
    """The model for a job's config. trainctl also calls it before reserving anything (on the
    meta device) to check pipeline split points and tensor plans against the real model."""
    cfg = {**DEFAULTS, **config}
    return GPT(GPTConfig(seq=cfg["seq"], layers=cfg["layers"], heads=cfg["heads"], dim=cfg["dim"]))


def train(ctx) -> None:
    cfg = {**DEFAULTS, **ctx.config}
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    data = ctx.dataset("train", device=ctx.device)  # batches on the rank's device, copied ahead
    seq = data.manifest.schema.field("tokens").type.list_size - 1
    # Built without storage: the strategy allocates only what this rank holds (its shards,
    # its pipeline stages) and initialises it with each module's reset_parameters()
    with torch.device("meta"):
        model = build_model({**cfg, "seq": seq})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    model, optimizer = ctx.prepare(model, optimizer)
    ctx.restore({"model": model, "optimizer": optimizer})
    ctx.set_total_steps(cfg["steps"])
    while ctx.step < cfg["steps"]:
        for batch in data:
            tokens = batch["tokens"].long()
            # the strategy runs forward/backward/step its way (a pipeline schedules micro-batches)
            loss = ctx.train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], token_loss)
            mean_loss = ctx.all_reduce(loss.clone(), op="mean")
            due = (ctx.step + 1) % cfg["checkpoint_every"] == 0
            ctx.report({"loss": mean_loss, "samples": len(tokens), "tokens": tokens[:, 1:].numel()},
                       checkpoint={"model": model, "optimizer": optimizer} if due else None)
            if ctx.step >= cfg["steps"]:
                break
    if ctx.is_main:
        print(f"trained {ctx.step} steps, final loss {mean_loss.item():.4f}")
