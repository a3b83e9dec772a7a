"""Post-training passes: pruning and quantization, each measured and gated, plus a report.

    from orchestrator.compress import load_compressed
    model = load_compressed("runs/<job>/post_training/model")   # weights_only / torch.export, no pickle

`run_pipeline` runs a job spec's `post_training` on a checkpoint (the job stage
POST_TRAINING and `trainctl compress` both call it).
"""

from __future__ import annotations

from .artifact import load_compressed
from .pipeline import run_pipeline

__all__ = ["load_compressed", "run_pipeline"]
