"""Worker actors, one per rank, placed in the job's placement group."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .layout import RankSlot, gpu_order, lay_out_ranks


@ray.remote(max_restarts=0)
class WorkerActor:
    def node_info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def run(self, env_vars: dict[str, str], fn, *args) -> Any:
        os.environ.update(env_vars)
        return fn(*args)


def rank_env(slot: RankSlot, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables torchrun sets for a rank (plus NUM_NODES); its restart variables
    (TORCHELASTIC_*) are the job's, set for a script job by orchestrator/runtime/script.py."""
    return {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(slot.local_rank),
        "LOCAL_WORLD_SIZE": str(slot.local_world_size),
        "NODE_RANK": str(slot.node_rank),
        "GROUP_RANK": str(slot.node_rank),
        "GROUP_WORLD_SIZE": str(slot.num_nodes),
        "ROLE_RANK": str(slot.rank),  # one role ("default") holds every rank, as under plain torchrun
        "ROLE_WORLD_SIZE": str(world_size),
        "ROLE_NAME": "default",
        "NUM_NODES": str(slot.num_nodes),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


# A worker without GPUs must not see the node's: Ray (2.60) no longer hides them from
# actors with num_gpus=0 (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO restores the old way), and
# DeepSpeed would pick CUDA while the rank's tensors stay on the CPU.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def gpu_env(infos: list[dict], slots: list[RankSlot]) -> dict[int, dict[str, str]]:
    """Per worker index: the GPU variables of its rank.

    Workers of one node see all that node's GPUs (NCCL peer access), listed so that each
    local rank's own (lowest) GPU is device LOCAL_RANK: DeepSpeed and torchrun-style code use
    cuda:LOCAL_RANK, trainctl TRAINCTL_DEVICE_INDEX, and both must be the same GPU. A
    worker's further GPUs, then, come after every worker's first. Workers sharing a GPU
    (fractions) share its index."""
    by_node: dict[str, list[RankSlot]] = {}
    for slot in sorted(slots, key=lambda s: s.rank):
        by_node.setdefault(slot.node_id, []).append(slot)
    out: dict[int, dict[str, str]] = {}
    for node_slots in by_node.values():
        own = {s.worker_index: sorted(infos[s.worker_index]["gpu_ids"], key=gpu_order) for s in node_slots}
        firsts = [own[s.worker_index][0] for s in node_slots if own[s.worker_index]]
        rest = sorted({g for ids in own.values() for g in ids[1:]} - set(firsts), key=gpu_order)
        visible = list(dict.fromkeys(firsts)) + rest
        for slot in node_slots:
            ids = own[slot.worker_index]
            out[slot.worker_index] = dict(CPU_ONLY_ENV) if not ids else {
                "CUDA_VISIBLE_DEVICES": ",".join(visible),
                "TRAINCTL_USE_GPU": "1",
                "TRAINCTL_DEVICE_INDEX": str(visible.index(ids[0])),
            }
    return out


class WorkerGroup:
    """The actors of one attempt of one job. Created, laid out, run, then killed as a whole."""

    def __init__(self, pg, size: int, cpus: float, gpus: float, runtime_env: dict | None = None,
                 colocate: int = 1):
        self.pg, self.size, self.cpus, self.gpus = pg, size, cpus, gpus
        self.colocate = colocate  # workers per bundle: worker i lives in bundle i // colocate
        self.runtime_env = runtime_env or {}
        self.actors: list = []
        self.infos: list[dict] = []
        self.slots: list[RankSlot] = []
        self.env_by_rank: list[dict[str, str]] = []

    async def start(self) -> list[RankSlot]:
        self.actors = [
            WorkerActor.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i // self.colocate
                ),
                runtime_env=self.runtime_env,
            ).remote()
            for i in range(self.size)
        ]
        self.infos = list(await asyncio.gather(*[a.node_info.remote() for a in self.actors]))
        self.slots = lay_out_ranks([(i["node_id"], i["node_ip"]) for i in self.infos],
                                   [i["gpu_ids"] for i in self.infos])
        rank0 = self.slots[0]
        master_addr = rank0.node_ip
        master_port = await self.actors[rank0.worker_index].free_port.remote(master_addr)
        gpu = gpu_env(self.infos, self.slots)
        self.env_by_rank = [
            {**rank_env(s, self.size, master_addr, master_port), **gpu.get(s.worker_index, {})}
            for s in self.slots
        ]
        return self.slots

    def placement(self) -> list[dict]:
        return [
            {"rank": s.rank, "node_rank": s.node_rank, "local_rank": s.local_rank,
             "node_id": s.node_id, "node_ip": s.node_ip,
             "hostname": self.infos[s.worker_index]["hostname"],
             "pid": self.infos[s.worker_index]["pid"]}
            for s in self.slots
        ]

    def run(self, fn, args_by_rank: list[tuple]) -> list:
        """Start fn on every rank; returns one ObjectRef per rank, in rank order."""
        return [
            self.actors[slot.worker_index].run.remote(self.env_by_rank[slot.rank], fn, *args_by_rank[slot.rank])
            for slot in self.slots
        ]

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
