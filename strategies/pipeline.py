"""Pipeline parallel with `torch.distributed.pipelining`: the model is cut into stages at
named modules, each rank runs its stage(s), and a schedule (GPipe, 1F1B, interleaved
1F1B) streams micro-batches through them. A hybrid layout with every rank on the
pipeline dimension (and, with `dp`, replicas of the whole pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from .hybrid import HybridStrategy
from .registry import register


@register("pipeline")
class PipelineStrategy(HybridStrategy):
    @dataclass
    class Options(HybridStrategy.Options):
        dp: int = 1    # replicas of the whole pipeline
        pp: int = -1   # stages: the world size divided by dp

    @classmethod
    def colocated_ranks(cls, options) -> int:
        return 1
