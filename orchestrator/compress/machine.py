"""Facts about the machine a measurement was taken on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def facts() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .quantize import engine

    model, flags = _cpuinfo()
    versions = {"torch": torch.__version__}
    for dist in ("torchao", "torch-pruning"):  # from the installed metadata: no import needed
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return {
        "cpu": model, "machine": platform.machine(), "cores": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
        "torch_threads": torch.get_num_threads(),
        "quantized_engine": engine(),
        "quantized_engines": [e for e in torch.backends.quantized.supported_engines if e != "none"],
        "versions": versions, "python": platform.python_version(),
    }
