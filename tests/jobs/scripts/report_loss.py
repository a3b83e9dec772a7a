"""A script job that reports its loss through orchestrator.report (no ctx API) and prints the
torchrun variables it was given."""

import os

import orchestrator

names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
         "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
         "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"]
print("env " + " ".join(f"{n}={os.environ.get(n, '<unset>')}" for n in names), flush=True)
orchestrator.report({"total_steps": 5})
for step in range(1, 6):
    orchestrator.report({"loss": 1.0 / step, "step": step})
print("reported 5 steps", flush=True)
