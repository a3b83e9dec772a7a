"""First: can this machine run anything on its GPU at all (CUDA, bf16, nccl on one rank)?"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

# One nccl rank as trainctl's ranks make their process group (cpu:gloo,cuda:nccl with
# device_id), in a child process: a hung nccl must not hang the suite.
ONE_RANK_NCCL = r"""
import socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                        world_size=1, device_id=device)
x = torch.full((1024,), 2.0, device=device)
dist.all_reduce(x)
torch.cuda.synchronize()
assert x.sum().item() == 2048.0, x.sum().item()
y = torch.ones(4)
dist.all_reduce(y)  # the gloo half of the group
assert y.sum().item() == 4.0
dist.destroy_process_group()
print("nccl ok", torch.cuda.nccl.version())
"""


def test_cuda_is_available_with_a_cuda_build_of_torch():
    import torch

    assert torch.version.cuda, f"torch {torch.__version__} is a CPU build"
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
    x = torch.randn(256, 256, device="cuda")
    assert torch.isfinite((x @ x).sum()).item()
    print(f"\n{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")


def test_bf16_is_supported():
    import torch

    assert torch.cuda.is_bf16_supported()
    a = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16)
    assert (a @ a).dtype == torch.bfloat16


def test_nccl_is_available_and_one_rank_all_reduces():
    import torch.distributed as dist

    assert dist.is_available() and dist.is_nccl_available()
    out = subprocess.run([sys.executable, "-c", ONE_RANK_NCCL], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0 and "nccl ok" in out.stdout, out.stdout + out.stderr[-3000:]
