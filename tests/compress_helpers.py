"""Shared by the post-training tests: digits shards and a trained digits checkpoint, made fast."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from orchestrator.data.writer import shard_dataset
from orchestrator.spec import parse_spec
from strategies.base import Strategy

from .helpers import REPO


def digits_data(directory: Path) -> dict[str, str]:
    paths = {}
    for split in ("train", "eval"):
        out = directory / f"digits-{split}"
        if not (out / "manifest.json").exists():
            shard_dataset([f"examples.digits.data:digits_{split}"], str(out))
        paths[split] = str(out)
    return paths


def trained_checkpoint(directory: Path, hidden: int = 128, epochs: int = 8) -> Path:
    """A digits classifier trained in-process, saved as a job would save it (DCP tensors/ + extra.pt)."""
    from examples.digits.data import _split
    from examples.digits.hooks import build_model

    torch.manual_seed(0)
    model = build_model({"hidden": hidden})
    X, _, y, _ = _split()
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(X), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    ckpt = directory / "runs" / "digits" / "checkpoint_000001"
    ckpt.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        Strategy().save_checkpoint({"model": model, "optimizer": opt, "epoch": epochs - 1}, ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"index": 1, "step": 1}))
    return ckpt


def digits_job(data: dict[str, str], hidden: int = 128, **post) -> dict:
    post = {"hooks": "examples.digits.hooks", "gate": {"metric": "accuracy", "max_drop": 0.01},
            "eval": {"threads": 1, "latency_iters": 50}, **post}
    return {
        "name": "digits-compress", "entrypoint": "examples.digits.train:train", "working_dir": str(REPO),
        "config": {"hidden": hidden, "epochs": 2},
        "data": {"train": {"path": data["train"], "batch_size": 32, "shuffle": True},
                 "eval": {"path": data["eval"], "batch_size": 512, "drop_last": False}},
        "post_training": post,
    }


def digits_spec(data: dict[str, str], passes: list, hidden: int = 128, **post):
    return parse_spec(digits_job(data, hidden, passes=passes, **post))
