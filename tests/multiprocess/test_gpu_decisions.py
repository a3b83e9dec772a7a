"""GPU decisions made without a GPU: the process-group backend and bound device, which
layouts a backend can run, a rank's device check, Horovod's NCCL check and its build
variants. Each is a pure function of its inputs, so it is checked here on CPU; the tests
marked `gpu` run the same paths on a real GPU (skipped without one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from strategies import StrategyConfigError, get_strategy_class
from strategies.base import (
    GPU_BACKEND,
    Layout,
    ProcessGroupPlan,
    WorkerEnv,
    cuda_device_problem,
    init_process_group,
    plan_process_group,
)

from ..gpt_ranks import free_port
from ..helpers import REPO

pytestmark = pytest.mark.timeout(120)


# ---- which backend and device a rank's process group gets ------------------------------

@pytest.mark.parametrize(("backend", "use_gpu", "device_index", "world_size", "expected"), [
    ("auto", False, 0, 2, ProcessGroupPlan("gloo", None)),
    ("auto", True, 1, 2, ProcessGroupPlan(GPU_BACKEND, 1)),
    ("nccl", True, 3, 4, ProcessGroupPlan(GPU_BACKEND, 3)),  # CPU tensors still get gloo
    ("auto", True, 0, 1, ProcessGroupPlan(GPU_BACKEND, None)),  # alone: no bound device
    ("gloo", True, 0, 2, ProcessGroupPlan("gloo", None)),
    ("gloo", False, 0, 2, ProcessGroupPlan("gloo", None)),
    ("cpu:gloo,cuda:nccl", True, 2, 8, ProcessGroupPlan(GPU_BACKEND, 2)),
])
def test_process_group_plan(backend, use_gpu, device_index, world_size, expected):
    assert plan_process_group(backend, use_gpu, device_index, world_size) == expected


def test_nccl_on_a_rank_without_gpus_is_an_error():
    with pytest.raises(StrategyConfigError, match="backend 'nccl' runs on GPUs"):
        plan_process_group("nccl", False, 0, 2)


def test_the_gloo_path_joins_a_real_group_and_reduces():
    """backend auto on CPU: a real (one-rank) gloo group, through the one init function."""
    import torch.distributed as dist

    env = WorkerEnv(rank=0, world_size=1, master_port=free_port())
    init_process_group(env, "auto", 30)
    try:
        assert dist.get_backend() == "gloo"
        tensor = torch.ones(3)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


# ---- layouts a strategy's backend cannot run: rejected before reserving ---------------------

PG_STRATEGIES = ["ddp", "fsdp", "tensor", "hybrid", "pipeline", "deepspeed"]


@pytest.mark.parametrize("name", PG_STRATEGIES)
def test_shared_gpus_are_rejected_under_nccl_and_allowed_with_gloo(name):
    cls = get_strategy_class(name)
    with pytest.raises(StrategyConfigError) as info:
        cls.validate(Layout(2, gpus_per_worker=0.5), cls.parse_options({}))
    message = str(info.value)
    assert "resources.gpus_per_worker: 0.5" in message and "gpus_per_worker: 1" in message
    assert "backend: gloo" in message and "\n" not in message
    cls.validate(Layout(2, gpus_per_worker=0.5), cls.parse_options({"backend": "gloo"}))
    cls.validate(Layout(2, gpus_per_worker=1), cls.parse_options({}))


def test_horovod_rejects_shared_gpus_without_a_backend_to_switch_to():
    cls = get_strategy_class("horovod")
    with pytest.raises(StrategyConfigError) as info:
        cls.validate(Layout(2, gpus_per_worker=0.25), cls.parse_options({}))
    assert "resources.gpus_per_worker: 0.25" in str(info.value) and "gloo" not in str(info.value)


def test_nccl_without_gpus_is_rejected():
    cls = get_strategy_class("ddp")
    with pytest.raises(StrategyConfigError, match="backend 'nccl' runs on GPUs, but resources.gpus_per_worker is 0"):
        cls.validate(Layout(2), cls.parse_options({"backend": "nccl"}))
    cls.validate(Layout(2), cls.parse_options({"backend": "auto"}))


def test_a_fractional_gpu_job_exits_2_before_anything_is_created(tmp_path):
    from tests.cluster.test_cli import GOOD, _one_line_error

    from ..helpers import trainctl

    job = tmp_path / "job.yaml"
    job.write_text(GOOD.format(repo=REPO, runs=tmp_path / "runs"))
    result = trainctl("run", str(job), "--set", "resources.gpus_per_worker=0.5")
    _one_line_error(result, "resources.gpus_per_worker: 0.5 puts several ranks on one GPU",
                    "set resources.gpus_per_worker: 1")
    assert not (tmp_path / "runs").exists()


# ---- a rank's check of its own device (in Strategy.setup) ------------------------------------

def _rank(local_rank=0, device_index=0, local_world_size=2):
    return WorkerEnv(rank=local_rank, world_size=local_world_size, local_rank=local_rank,
                     local_world_size=local_world_size, use_gpu=True, device_index=device_index)


def test_device_check():
    assert cuda_device_problem(_rank(1, 1), 2, "4,5") is None
    assert "torch sees no CUDA device" in cuda_device_problem(_rank(), 0, "0,1")
    assert "its GPU is cuda:2 but torch sees only 2 device(s)" in cuda_device_problem(_rank(0, 2), 2, "0,1")
    mismatch = cuda_device_problem(_rank(0, 1), 2, "0,1")
    assert "would use cuda:0, another rank's GPU" in mismatch and "LOCAL_RANK 0" in mismatch
    # ranks sharing GPUs (4 local ranks on 2 devices) cannot have LOCAL_RANK == device
    assert cuda_device_problem(_rank(3, 1, local_world_size=4), 2, "0,1") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_a_gpu_rank_on_a_machine_without_cuda_fails_in_setup_with_one_clear_line():
    cls = get_strategy_class("ddp")
    with pytest.raises(RuntimeError) as info:
        cls(cls.parse_options({})).setup(_rank())
    assert "was given a GPU but torch sees no CUDA device" in str(info.value)


# ---- Horovod on GPUs needs an NCCL build ----------------------------------------------------

def test_horovod_gpu_job_with_the_cpu_build_is_rejected_with_the_rebuild_command():
    from strategies.horovod import nccl_built

    if nccl_built():
        pytest.skip("this Horovod was built with NCCL")
    cls = get_strategy_class("horovod")
    with pytest.raises(StrategyConfigError) as info:
        cls.validate(Layout(2, gpus_per_worker=1), cls.parse_options({}))
    assert "build_horovod.sh --gpu" in str(info.value) and "\n" not in str(info.value)
    cls.validate(Layout(2), cls.parse_options({}))  # the CPU path is unchanged


def _build_horovod(tmp_path, *args):
    env = {**os.environ, "TRAINCTL_WHEEL_CACHE": str(tmp_path / "wheels")}
    env.pop("HOROVOD_GPU_OPERATIONS", None)
    result = subprocess.run(["bash", str(REPO / "cluster/deploy/build_horovod.sh"), *args],
                            capture_output=True, text=True, env=env, timeout=60)
    return result, dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def test_build_script_caches_the_cpu_and_gpu_wheels_apart(tmp_path):
    python = str(REPO / ".venv/bin/python")
    cpu, cpu_plan = _build_horovod(tmp_path, "--dry-run", python)
    gpu, gpu_plan = _build_horovod(tmp_path, "--dry-run", "--gpu", python)
    assert cpu.returncode == gpu.returncode == 0, cpu.stderr + gpu.stderr
    assert cpu_plan["variant"] == "gpu_none" and cpu_plan["cache"].endswith("-gpu_none")  # as before
    assert gpu_plan["variant"] == "gpu_NCCL" and gpu_plan["cache"].endswith("-gpu_NCCL")
    if cpu_plan["installed"] == "cpu":  # a CPU build is kept for CPU, replaced for --gpu
        assert cpu_plan["action"] == "nothing" and gpu_plan["action"] == "build"
    bad, _ = _build_horovod(tmp_path, "--cuda", python)
    assert bad.returncode == 2 and "unknown option --cuda" in bad.stderr


# ---- on a real GPU -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_rank_reduces_cpu_and_cuda_tensors():
    import torch.distributed as dist

    env = WorkerEnv(rank=0, world_size=1, master_port=free_port(), use_gpu=True, device_index=0)
    cls = get_strategy_class("ddp")
    strategy = cls(cls.parse_options({}))
    strategy.setup(env)  # the device check, then init_process_group
    try:
        assert dist.get_backend() == GPU_BACKEND
        for device in ("cpu", "cuda:0"):
            tensor = torch.ones(2, device=device)
            dist.all_reduce(tensor)
            assert tensor.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def _two_gpu_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    env = WorkerEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                    master_port=port, use_gpu=True, device_index=rank)
    init_process_group(env, "auto", 60)  # bound to cuda:rank
    results = []
    for device in ("cpu", f"cuda:{rank}"):
        tensor = torch.full((2,), float(rank + 1), device=device)
        dist.all_reduce(tensor)
        results.append(tensor.tolist())
    dist.barrier()
    Path(out, f"rank{rank}").write_text(repr(results))
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_ranks_reduce_cpu_and_cuda_tensors(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_two_gpu_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == repr([[3.0, 3.0], [3.0, 3.0]])
