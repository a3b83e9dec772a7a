"""A DDP-style script job whose rank 1 stops in the middle of its first attempt (a stuck
training loop) while rank 0 waits for it in all_reduce; the restarted attempt finishes."""

import os
import sys
import time

print("starting", flush=True)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import orchestrator  # noqa: E402

STEPS, HANG_AT = int(sys.argv[1]), int(sys.argv[2])


def stuck_in_user_code():
    time.sleep(3600)


def train():
    dist.init_process_group("gloo")
    rank, attempt = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    orchestrator.report({"total_steps": STEPS})
    for step in range(1, STEPS + 1):
        if attempt == 0 and rank == 1 and step == HANG_AT:
            stuck_in_user_code()
        total = torch.ones(1)
        dist.all_reduce(total)  # rank 0 waits here for the stuck rank
        orchestrator.report({"step": step, "loss": 1.0 / step})
        print(f"step {step} world {int(total.item())}", flush=True)
        time.sleep(0.1)
    dist.destroy_process_group()


train()
