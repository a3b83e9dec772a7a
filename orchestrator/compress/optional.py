"""Lazy imports of the optional libraries, each with a one-line install hint."""

from __future__ import annotations

import importlib
import logging
import warnings

HINTS = {
    "torch_pruning": "structured pruning needs torch-pruning: pip install 'trainctl[compress]' (or pip install torch-pruning)",
    "torchao": "this quantization method needs torchao: pip install 'trainctl[compress]' (or pip install torchao)",
    "matplotlib": "report.png needs matplotlib: pip install 'trainctl[compress]' (or pip install matplotlib)",
}


class MissingDependency(ImportError):
    pass


def require(module: str):
    """Import `module` or raise MissingDependency with its install hint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # torchao logs about optional CUDA kernels it cannot load on a CPU machine
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                return importlib.import_module(module)
            finally:
                logging.disable(previous)
    except ImportError as exc:
        raise MissingDependency(HINTS.get(module.split(".")[0], f"pip install {module}")) from exc
