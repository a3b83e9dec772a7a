"""Last (it takes longest and says least about correctness): the GPT example's model under
trainctl against a bare single-GPU loop in the same run, and its MFU."""

from __future__ import annotations

import os

import pytest

from benchmarks import gpu_throughput as bench

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(420)]


def test_trainctl_keeps_up_with_a_bare_loop_on_one_gpu(client, gpt_data, tmp_path):
    steps = int(os.environ.get("TRAINCTL_GPU_BENCH_STEPS", "200"))
    result = bench.compare(client, gpt_data, tmp_path, steps=steps, warmup=30)
    print("\n" + "\n".join(bench.report_lines(result)))
    if result["mfu_trainctl"] is not None:
        assert 0 < result["mfu_trainctl"] < 1, result
    goal = float(os.environ.get("TRAINCTL_GPU_RATIO_GOAL", bench.GOAL_RATIO))
    assert result["ratio"] >= goal, "\n".join(bench.report_lines(result))
