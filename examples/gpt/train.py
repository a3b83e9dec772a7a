"""One training function for every strategy: only the job YAML chooses ddp, fsdp, ...

The loss reported is the mean over all ranks (one all-reduce per step), so it is the
loss of the global batch whatever the layout, and comparable across strategies.
"""

from __future__ import annotations

import torch

from .model import GPT, GPTConfig, lm_loss


def train(ctx) -> None:
    cfg = {"steps": 200, "lr": 3e-3, "seed": 0, "layers": 2, "heads": 4, "dim": 128,
           "checkpoint_every": 50, **ctx.config}
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    data = ctx.dataset("train")
    seq = data.manifest.schema.field("tokens").type.list_size - 1
    model = GPT(GPTConfig(seq=seq, layers=cfg["layers"], heads=cfg["heads"], dim=cfg["dim"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    model, optimizer = ctx.prepare(model, optimizer)
    ctx.restore({"model": model, "optimizer": optimizer})
    ctx.set_total_steps(cfg["steps"])
    while ctx.step < cfg["steps"]:
        for batch in data:
            tokens = batch["tokens"].long().to(ctx.device)
            loss = lm_loss(model, tokens)
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            mean_loss = ctx.all_reduce(loss.detach().clone(), op="mean")
            due = (ctx.step + 1) % cfg["checkpoint_every"] == 0
            ctx.report({"loss": mean_loss, "samples": len(tokens), "tokens": tokens[:, 1:].numel()},
                       checkpoint={"model": model, "optimizer": optimizer} if due else None)
            if ctx.step >= cfg["steps"]:
                break
    if ctx.is_main:
        print(f"trained {ctx.step} steps, final loss {mean_loss.item():.4f}")
