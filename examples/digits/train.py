"""An MLP classifier (4.3 M parameters) on scikit-learn's bundled 8x8 digits (no download), data parallel.

The data comes as sharded Arrow datasets (`make demo` writes them with
`trainctl data shard examples.digits.data:digits_train ...`): `ctx.dataset("train")`
is this rank's share, shuffled, and resumes mid-epoch from a checkpoint. The
held-out split is scored after every epoch, which is also when a checkpoint is saved.
"""

from __future__ import annotations

import torch
from torch import nn

# Wide enough that inference time is the matrix multiplies': at hidden 128 a batch-1 forward is
# ~30 us of per-call overhead that no post-training pass can shrink (int8 measured 0.39x there).
HIDDEN = 2048


def make_model(hidden: int = HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def evaluate(model: nn.Module, batches) -> tuple[int, int]:
    """(correct, total) over an iterable of {"image", "label"} batches."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            correct += (model(batch["image"]).argmax(dim=1) == batch["label"]).sum().item()
            total += len(batch["label"])
    model.train()
    return correct, total


def train(ctx) -> None:
    cfg = {"epochs": 15, "lr": 0.1, "hidden": HIDDEN, "seed": 0, **ctx.config}
    torch.manual_seed(cfg["seed"])
    train_data = ctx.dataset("train", device=ctx.device)  # batches where the model is, copied ahead
    model = make_model(cfg["hidden"])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    model, optimizer = ctx.prepare(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    # Optional: halve the learning rate when held-out accuracy plateaus (torch's own scheduler;
    # config lr_plateau_patience: epochs without improvement). On the optimizer ctx.prepare
    # returned (it may be a new one); ddp, fsdp and horovod give a torch optimizer.
    plateau = None
    if cfg.get("lr_plateau_patience") is not None:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=cfg["lr_plateau_patience"])

    state = ctx.restore({"model": model, "optimizer": optimizer})  # also puts train_data where it was
    if plateau is not None and state and "lr_plateau" in state:
        plateau.load_state_dict(state["lr_plateau"])  # the optimizer's lr came back with it
    ctx.set_total_steps(cfg["epochs"] * (train_data.num_rows // ctx.world_size // train_data.batch_size))
    for epoch in range(train_data.epoch, cfg["epochs"]):
        for batch in train_data:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            ctx.backward(loss)
            optimizer.step()
            ctx.report({"loss": loss.detach(), "samples": len(batch["label"])})
        # each rank scores its share of the held-out split; the sums make the accuracy
        eval_data = ctx.dataset("eval", device=ctx.device)
        counts = torch.tensor(evaluate(ctx.strategy.unwrap(model), eval_data), dtype=torch.float64)
        correct, total = ctx.all_reduce(counts).tolist()
        acc = correct / total
        if ctx.is_main:
            print(f"epoch {epoch}: loss {loss.item():.4f} held-out accuracy {acc:.4f}")
        extra = {}
        if plateau is not None:
            plateau.step(acc)  # the same all-reduced accuracy on every rank: the same lr everywhere
            extra = {"lr_plateau": plateau.state_dict()}
        ctx.report({"step": ctx.step, "epoch": epoch, "accuracy": acc, "lr": optimizer.param_groups[0]["lr"]},
                   checkpoint={"model": model, "optimizer": optimizer, "epoch": epoch, **extra})
