"""The contract between a job's code and the post-training passes.

The hooks module (`post_training.hooks`, default: the entrypoint's module) provides:

    build_model(config: dict) -> nn.Module          required: the model, untrained, from ctx.config
    evaluate(model, batches) -> dict[str, float]    required for a gate metric: e.g. {"accuracy": 0.97}
    model_inputs(batch: dict) -> tuple              optional: forward's arguments for one batch
                                                    (default: the batch's first column)
    loss(model, batch) -> Tensor                    required for fine-tuning after pruning
    prune_ignore(model) -> list[nn.Module]          optional: modules structured pruning keeps whole
                                                    (the output layer is always kept)
    attention_heads(model) -> dict[nn.Module, int]  optional: each attention's q/k/v projections and
                                                    its head count; structured pruning then removes
                                                    whole heads (the model must read its head count
                                                    from the projections' width, not a stored number)
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..importing import importable_from


class HooksError(ValueError):
    """The hooks module is missing or lacks a function a pass needs."""


def _first_column(batch: dict) -> tuple:
    return (next(iter(batch.values())),)


@dataclass
class Hooks:
    module: str
    build_model: Callable
    evaluate: Callable | None
    model_inputs: Callable
    loss: Callable | None
    prune_ignore: Callable | None
    attention_heads: Callable | None = None


def hooks_module(spec) -> str:
    return spec.post_training.hooks or spec.entrypoint.partition(":")[0]


def load_hooks(module_name: str, working_dir: str | None = None) -> Hooks:
    try:
        with importable_from(working_dir):
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise HooksError(f"post_training.hooks: cannot import {module_name!r}: {type(exc).__name__}: {exc}; "
                         "set post_training.hooks to an importable module") from None
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise HooksError(f"post_training.hooks: module {module_name!r} has no build_model(config); add it or set "
                         "post_training.hooks to a module that has")
    get = lambda name: getattr(module, name, None) if callable(getattr(module, name, None)) else None  # noqa: E731
    return Hooks(module_name, build, get("evaluate"), get("model_inputs") or _first_column, get("loss"),
                 get("prune_ignore"), get("attention_heads"))


def check_hooks(spec, working_dir: str | None = None) -> Hooks:
    """What the passes of `spec` need from the hooks module is there (raises HooksError)."""
    post = spec.post_training
    hooks = load_hooks(hooks_module(spec), working_dir)
    if post.gate.metric and hooks.evaluate is None:
        raise HooksError(f"post_training.gate.metric: hooks module {hooks.module!r} has no "
                         "evaluate(model, batches) -> dict; add it")
    if any(p.prune is not None and p.prune.finetune for p in post.passes) and hooks.loss is None:
        raise HooksError(f"post_training: fine-tuning needs loss(model, batch) in hooks module {hooks.module!r}; add it")
    return hooks


def load_trained_model(hooks: Hooks, config: dict, checkpoint_dir: str | Path, model_key: str = "model"):
    """The checkpoint's model, loaded into a plain single-process module (any saving layout)."""
    import torch
    import torch.distributed.checkpoint as dcp

    tensors = Path(checkpoint_dir) / "tensors"
    if not tensors.exists():
        raise HooksError(f"{checkpoint_dir}: no model tensors in this checkpoint (no tensors/)")
    saved = dcp.FileSystemReader(str(tensors)).read_metadata().state_dict_metadata
    modules = sorted({k.split(".")[1] for k in saved if k.startswith("model.") and k.count(".") >= 2})
    if model_key not in modules:
        raise HooksError(f"{checkpoint_dir}: no module {model_key!r} in this checkpoint (it has: "
                         f"{', '.join(modules) or 'none'}); set post_training.model_key")
    model = hooks.build_model(dict(config))
    container = torch.nn.ModuleDict({model_key: model})
    state = {"model": container.state_dict()}
    for key, tensor in state["model"].items():
        meta = saved.get(f"model.{key}")
        size = list(getattr(meta, "size", None) or [])
        if meta is None or size != list(tensor.shape):
            raise HooksError(f"{checkpoint_dir}: build_model(config) does not match the trained model at {key} "
                             f"(checkpoint {size or 'missing'}, built {list(tensor.shape)}); it must build the "
                             "trained architecture from the job's config")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(tensors), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as exc:  # CheckpointException is a BaseException
        raise HooksError(f"{checkpoint_dir}: cannot load {model_key!r} into build_model(config)'s model: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    container.load_state_dict(state["model"])
    return model.eval()


def to_inputs(hooks: Hooks, batch: dict) -> tuple[Any, ...]:
    out = hooks.model_inputs(batch)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
