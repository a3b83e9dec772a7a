"""Training functions for the GPU placement tests (tests/cluster/test_gpu_placement.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "LOCAL_RANK", "TRAINCTL_USE_GPU")


def reports_devices(ctx) -> None:
    """Writes what this rank sees of the node's GPUs to config['out']/rank{N}.json."""
    seen = {name: os.environ.get(name) for name in DEVICE_VARS}
    seen["device"] = str(ctx.device)
    Path(ctx.config["out"], f"rank{ctx.rank}.json").write_text(json.dumps(seen))
