"""A GPU job's metrics on the controller's /metrics: GPU memory, utilisation (NVML) or the
rank's one line saying why not, collectives timed on the device, the loss as a number."""

from __future__ import annotations

import importlib.util
import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.monitoring import metrics as M

from ..helpers import wait_for
from .common import finished, gpu_job

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(240)]


def _samples(endpoint: str, job_id: str) -> dict[str, list]:
    text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == job_id:
                out.setdefault(s.name, []).append(s)
    return out


def test_gpu_metrics_reach_the_metrics_endpoint(client, gpt_data, tmp_path):
    gate = tmp_path / "gate"
    job_id = client.submit(gpu_job("gpu-metrics", tmp_path, gpt_data, config={"gate": str(gate)}))
    endpoint = client.info["metrics"]
    nvml = importlib.util.find_spec("pynvml") is not None  # the ranks run in this environment
    wanted = [M.GPU_ALLOCATED.name, M.GPU_RESERVED.name, f"{M.COLLECTIVE_DURATION.name}_count", M.LOSS.name]
    if nvml:
        wanted.append(M.GPU_UTILIZATION.name)
    try:
        got = wait_for(lambda: (s := _samples(endpoint, job_id)) and all(n in s for n in wanted) and s, 150,
                       what=f"{wanted} for the job on {endpoint}")
    finally:
        gate.touch()
    assert got[M.GPU_ALLOCATED.name][0].value > 0
    assert got[M.GPU_RESERVED.name][0].value >= got[M.GPU_ALLOCATED.name][0].value
    assert math.isfinite(got[M.LOSS.name][0].value)
    counts = {s.labels["op"]: s.value for s in got[f"{M.COLLECTIVE_DURATION.name}_count"]}
    sums = {s.labels["op"]: s.value for s in got[f"{M.COLLECTIVE_DURATION.name}_sum"]}
    assert counts.get("all_reduce", 0) > 0 and sums["all_reduce"] > 0  # CUDA events were read
    if nvml:
        assert 0 <= got[M.GPU_UTILIZATION.name][0].value <= 1
    job = finished(client, job_id)
    assert isinstance(job["metrics"]["loss"], float)
    logs, _ = client.read_logs(job_id)
    said = logs.count("gpu_utilization_ratio) is not exported")
    assert said == (0 if nvml else 1), logs[-3000:]
