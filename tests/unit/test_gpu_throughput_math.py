"""The GPU benchmark's arithmetic (no GPU needed): peak flops by device name, MFU."""

from __future__ import annotations

import pytest

from benchmarks.gpu_throughput import mfu, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("Some Future GPU", None),
])
def test_peak_bf16_flops_by_device_name(name, peak):
    assert peak_flops(name, environ={}) == peak


def test_the_environment_overrides_the_table_and_mfu_is_six_flops_per_parameter_token():
    assert peak_flops("NVIDIA H200", environ={"TRAINCTL_PEAK_FLOPS": "1e15"}) == 1e15
    # 100M parameters at 500k tokens/s on a 989 TFLOPS part: 3e14 / 9.89e14
    assert mfu(100_000_000, 500_000, 989e12) == pytest.approx(0.3033, rel=1e-3)
    assert mfu(100_000_000, 500_000, None) is None
