"""The compressed model on disk, and its loader. No arbitrary pickle anywhere.

A model directory holds:
    recipe.json   how to rebuild the module: hooks module + config (build_model), the shapes
                  structured pruning changed, the quantization applied, sparse-encoded tensors
    model.pt      the state dict, loadable with torch.load(..., weights_only=True); tensors that
                  are mostly zeros (unstructured pruning) are stored as a bit mask + the non-zeros
  or
    model.pt2     (static_int8) a torch.export program: load it with torch.export.load

    from orchestrator.compress import load_compressed
    model = load_compressed("runs/<job>/post_training/model")   # an eval-mode nn.Module
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

FORMAT = "trainctl-compressed/1"
SIMPLE = (int, float, str, tuple, list)


# ---- structure: what structured pruning changed ------------------------------------------

def structure_of(model, fresh) -> dict:
    """Per module: the shapes of parameters/buffers and the simple attributes that differ from
    a freshly built model (what a loader must change before load_state_dict fits)."""
    fresh_modules = dict(fresh.named_modules())
    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        base = fresh_modules.get(name)
        if base is None or type(base) is not type(module):
            continue
        shapes = {}
        for store, base_store in ((module._parameters, base._parameters), (module._buffers, base._buffers)):
            for key, t in store.items():
                b = base_store.get(key)
                if t is not None and b is not None and tuple(t.shape) != tuple(b.shape):
                    shapes[key] = list(t.shape)
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_") or isinstance(value, bool) or not isinstance(value, SIMPLE):
                continue
            if getattr(base, key, None) != value:
                try:
                    json.dumps(value)
                except TypeError:
                    continue
                attrs[key] = value
        if shapes or attrs:
            out[name] = {"shapes": shapes, "attrs": attrs}
    return out


def apply_structure(model, structure: dict) -> None:
    import torch
    from torch import nn

    for name, change in structure.items():
        module = model.get_submodule(name) if name else model
        for key, value in change.get("attrs", {}).items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) else value)
        for key, shape in change.get("shapes", {}).items():
            old = getattr(module, key)
            new = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = new


# ---- sparse encoding: honest size for unstructured pruning --------------------------------

def _encode(state: dict) -> tuple[dict, dict]:
    """Mostly-zero dense float tensors become (bit mask, non-zero values) when that is smaller."""
    import numpy as np
    import torch

    out, sparse = OrderedDict(), {}
    out._metadata = copy.deepcopy(getattr(state, "_metadata", None))  # module versions, for loading
    for key, t in state.items():
        plain = type(t) is torch.Tensor and t.is_floating_point() and not t.is_quantized and t.numel() >= 256
        if plain:
            flat = t.detach().reshape(-1)
            mask = flat != 0
            nnz = int(mask.sum())
            encoded = (t.numel() + 7) // 8 + nnz * t.element_size()
            if encoded < 0.9 * t.numel() * t.element_size():
                bits = np.packbits(mask.numpy().astype(np.uint8))
                out[f"{key}::mask"] = torch.from_numpy(bits)
                out[f"{key}::values"] = flat[mask].clone()
                sparse[key] = list(t.shape)
                continue
        out[key] = t
    return out, sparse


def _decode(saved: dict, sparse: dict) -> dict:
    import numpy as np
    import torch

    out = OrderedDict((k, v) for k, v in saved.items() if "::" not in k)
    out._metadata = getattr(saved, "_metadata", None)
    for key, shape in sparse.items():
        n = int(np.prod(shape)) if shape else 1
        mask = torch.from_numpy(np.unpackbits(saved[f"{key}::mask"].numpy())[:n].astype(bool))
        values = saved[f"{key}::values"]
        dense = torch.zeros(n, dtype=values.dtype)
        dense[mask] = values
        out[key] = dense.reshape(shape)
    return out


# ---- save / load --------------------------------------------------------------------------

def save_model(model, directory: str | Path, recipe: dict, program=None) -> int:
    """Write the model directory; returns the size of the weights file in bytes."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {"format": FORMAT, **recipe}
    for stale in ("model.pt", "model.pt2"):
        (directory / stale).unlink(missing_ok=True)
    if program is not None:
        weights = directory / "model.pt2"
        torch.export.save(program, weights)
        recipe.update(weights="model.pt2", sparse={})
    else:
        encoded, sparse = _encode(model.state_dict())
        weights = directory / "model.pt"
        torch.save(encoded, weights)
        recipe.update(weights="model.pt", sparse=sparse)
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    return weights.stat().st_size


def read_recipe(directory: str | Path) -> dict:
    path = Path(directory) / "recipe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a compressed model directory (no recipe.json)")
    recipe = json.loads(path.read_text())
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown format {recipe.get('format')!r} (expected {FORMAT})")
    return recipe


def load_compressed(directory: str | Path, build_model=None, working_dir: str | None = None) -> Any:
    """The compressed model as an eval-mode module.

    `build_model(config)` defaults to the recipe's hooks module (importable from `working_dir`
    or sys.path). A static_int8 model is a torch.export program's module (run it under
    torch.compile for the int8 kernels)."""
    import torch

    directory = Path(directory)
    recipe = read_recipe(directory)
    if recipe["weights"] == "model.pt2":
        from .quantize import exported_module

        return exported_module(torch.export.load(directory / "model.pt2"))
    if build_model is None:
        from .hooks import load_hooks

        build_model = load_hooks(recipe["hooks"], working_dir).build_model
    model = build_model(dict(recipe.get("config", {})))
    apply_structure(model, recipe.get("structure", {}))
    quant = recipe.get("quantize")
    if quant:
        from . import quantize

        if quant["method"] == "dynamic_int8":
            model = quantize.dynamic_int8(model)
        else:
            model = quantize.weight_only(model, quant["method"], quant.get("group_size", 32))
    from .quantize import quiet

    with quiet():  # torch's TypedStorage notice when quantized tensors are read back
        saved = torch.load(directory / recipe["weights"], map_location="cpu", weights_only=True)
    state = _decode(saved, recipe.get("sparse", {}))
    model.load_state_dict(state, assign=bool(quant and quant["method"].startswith("weight_only")))
    return model.eval()
