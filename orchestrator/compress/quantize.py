"""Quantization passes: dynamic int8 (torch.ao), static int8 (PT2E, x86 inductor), weight-only (torchao)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

from .optional import require


@contextmanager
def quiet():
    """torch.ao's deprecation notices and torchao's kernel-loading logs, once per pass, are noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def engine() -> str:
    import torch

    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack", "onednn"):
        if name in engines:
            return name
    return torch.backends.quantized.engine


def dynamic_int8(model):
    """Linear (and LSTM/GRU) weights to int8; activations quantized on the fly per batch."""
    import torch
    from torch import nn

    torch.backends.quantized.engine = engine()
    with quiet():
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear, nn.LSTM, nn.GRU},
                                                      dtype=torch.qint8)


def weight_only_config(method: str, group_size: int):
    import torch

    with quiet():
        q = require("torchao.quantization")
        if method == "weight_only_int8":
            return q.Int8WeightOnlyConfig()
        granularity = require("torchao.quantization.granularity")
        # the int4 kernels torchao ships (tinygemm, mslk) are CUDA-only; Intx is its CPU path
        return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity.PerGroup(group_size))


def weight_only(model, method: str, group_size: int):
    q = require("torchao.quantization")
    with quiet():
        q.quantize_(model.eval(), weight_only_config(method, group_size))
    return model


def export(model, example_inputs: tuple):
    """torch.export with a dynamic batch dimension (so batch 1 and batch N both run)."""
    import torch

    dynamic = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(x) else None for x in example_inputs)
    return torch.export.export(model, example_inputs, dynamic_shapes=dynamic)


def static_int8(model, example_inputs: tuple, calibration: list[tuple]):
    """PT2E: export, insert observers (x86 inductor quantizer), calibrate, convert.

    Returns the converted module and its exported program (the saved form)."""
    import torch

    with quiet():
        pt2e = require("torchao.quantization.pt2e.quantize_pt2e")
        xiq = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = pt2e.prepare_pt2e(export(model.eval(), example_inputs).module(), quantizer)
        with torch.no_grad():
            for inputs in calibration:
                prepared(*inputs)
        converted = _drop_unused(pt2e.convert_pt2e(prepared))
        program = export(converted, example_inputs)
    program._example_inputs = None  # not needed to run it; would be saved with the weights
    return exported_module(program), program


def _drop_unused(gm):
    """convert_pt2e folds the int8 weights into new constants; the fp32 originals stay attached
    unused. Drop them, so the saved program holds the int8 weights only."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in [*gm.named_parameters(), *gm.named_buffers()] if k not in used]:
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)
    gm.recompile()
    return gm


def exported_module(program):
    """The program as a module on which .eval()/.train() work (hooks' evaluate may call them)."""
    with quiet():
        pt2e = require("torchao.quantization.pt2e")
        module = program.module()
        pt2e.allow_exported_model_train_eval(module)
    return module
