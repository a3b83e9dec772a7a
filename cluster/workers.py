"""A job's ranks in its placement group: forked from the node's warm zygote (WarmWorkerGroup,
the default: cluster/rank_host.py), or one new Ray worker actor each (WorkerGroup, the classic
path: TRAINCTL_WARM_START=0, or a job whose environment a fork cannot honour)."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import rank_host
from .layout import RankSlot, gpu_order, lay_out_ranks
from .wire import RankOutcome


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


def rank_placement(slots: list[RankSlot], infos: list[dict]) -> list[dict]:
    """Where each rank runs (status's `placement`), from its slot and its worker's node info."""
    return [
        {"rank": s.rank, "node_rank": s.node_rank, "local_rank": s.local_rank,
         "node_id": s.node_id, "node_ip": s.node_ip,
         "hostname": infos[s.worker_index]["hostname"],
         "pid": infos[s.worker_index]["pid"]}
        for s in slots
    ]


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
        return rank_placement(self.slots, self.infos)

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


# ---- warm start: ranks forked from the node's zygote --------------------------------------

@ray.remote(max_retries=0)
def _probe_bundle() -> dict:
    """Run in a bundle with the bundle's resources and no runtime_env (so a pooled worker
    takes it): where the bundle is, which GPUs Ray gave it, a free port on its node."""
    ctx = ray.get_runtime_context()
    node_ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((node_ip, 0))
        port = s.getsockname()[1]
    return {"node_id": ctx.get_node_id(), "node_ip": node_ip, "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "port": port}


def split_bundle_gpus(gpu_ids: list[str], colocate: int, gpus_per_worker: float) -> list[list[str]]:
    """A bundle's GPUs (as Ray gave them to one probe of the whole bundle) per colocated worker,
    as Ray would give them to `colocate` actors of `gpus_per_worker` each: whole GPUs in turn,
    a fraction shares one (worker k: the GPU its share starts in)."""
    ids = sorted(gpu_ids, key=gpu_order)
    if not ids or gpus_per_worker <= 0:
        return [[] for _ in range(colocate)]
    out = []
    for k in range(colocate):
        start = math.floor(k * gpus_per_worker + 1e-9)
        end = max(start + 1, math.ceil((k + 1) * gpus_per_worker - 1e-9))
        out.append(ids[min(start, len(ids) - 1):min(end, len(ids))] or [ids[-1]])
    return out


class WarmWorkerGroup:
    """One attempt's ranks as processes forked from each node's zygote (cluster/rank_host.py).

    The placement group holds the resources exactly as for WorkerGroup; a probe per bundle
    says where it is and which GPUs it has; each rank is then a fresh fork on that node with
    the job's environment and working_dir. `zygote_module` is what the host runs as its zygote."""

    def __init__(self, pg, size: int, cpus: float, gpus: float, env_vars: dict[str, str],
                 package_uri: str | None, zygote_module: str, colocate: int = 1):
        self.pg, self.size, self.cpus, self.gpus = pg, size, cpus, gpus
        self.colocate = colocate
        self.env_vars, self.package_uri, self.zygote_module = env_vars, package_uri, zygote_module
        self.infos: list[dict] = []
        self.slots: list[RankSlot] = []
        self.env_by_rank: list[dict[str, str]] = []
        self.hosts: dict[str, Any] = {}   # node id -> its rank host
        self.tokens: list[str] = []       # per worker index
        self._pids: dict[str, list[int]] = {}  # node id -> the pids forked there (for shutdown)

    async def start(self) -> list[RankSlot]:
        bundles = self.size // self.colocate
        probes = await asyncio.gather(*[
            _probe_bundle.options(
                num_cpus=self.cpus * self.colocate, num_gpus=self.gpus * self.colocate,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=b),
            ).remote() for b in range(bundles)])
        self.infos = []
        for probe in probes:
            for gpus in split_bundle_gpus(probe["gpu_ids"], self.colocate, self.gpus):
                self.infos.append({**probe, "gpu_ids": gpus})
        self.slots = lay_out_ranks([(i["node_id"], i["node_ip"]) for i in self.infos],
                                   [i["gpu_ids"] for i in self.infos])
        rank0 = self.slots[0]
        master_addr, master_port = rank0.node_ip, self.infos[rank0.worker_index]["port"]
        gpu = gpu_env(self.infos, self.slots)
        self.env_by_rank = [
            {**rank_env(s, self.size, master_addr, master_port), **gpu.get(s.worker_index, {})}
            for s in self.slots
        ]
        self.tokens = [secrets.token_hex(8) for _ in range(self.size)]
        by_node: dict[str, list[RankSlot]] = {}
        for slot in self.slots:
            by_node.setdefault(slot.node_id, []).append(slot)
        await asyncio.gather(*[self._spawn_on(node_id, slots) for node_id, slots in by_node.items()])
        return self.slots

    def _launch(self, slot: RankSlot, token: str) -> rank_host.RankLaunch:
        return rank_host.RankLaunch(token, {**self.env_vars, **self.env_by_rank[slot.rank]},
                                    max(1, int(self.cpus)))

    async def _spawn_on(self, node_id: str, slots: list[RankSlot]) -> None:
        host = self.hosts.get(node_id) or rank_host.rank_host(node_id, self.zygote_module)
        self.hosts[node_id] = host
        pids = await host.spawn.remote([self._launch(s, self.tokens[s.worker_index]) for s in slots],
                                       self.package_uri)
        for slot, pid in zip(slots, pids, strict=True):
            self.infos[slot.worker_index]["pid"] = pid
        self._pids.setdefault(node_id, []).extend(pids)

    def placement(self) -> list[dict]:
        return rank_placement(self.slots, self.infos)

    def run(self, payload: bytes, relay_to) -> list:
        """Hand every rank its call (`payload`: the pickled (function, args)); returns one
        ObjectRef per rank, in rank order, of the rank's RankOutcome."""
        return [
            self.hosts[slot.node_id].run.remote(self.tokens[slot.worker_index], payload, relay_to, slot.rank)
            for slot in self.slots
        ]

    async def run_again(self, rank: int, payload: bytes, relay_to) -> RankOutcome:
        """A further call on `rank`'s node and environment, in a new fork (a rank process runs one call)."""
        slot = self.slots[rank]
        token = secrets.token_hex(8)
        host = self.hosts[slot.node_id]
        pids = await host.spawn.remote([self._launch(slot, token)], self.package_uri)
        self._pids.setdefault(slot.node_id, []).extend(pids)
        return await host.run.remote(token, payload, relay_to, rank)

    def shutdown(self) -> None:
        for node_id, pids in self._pids.items():
            try:
                self.hosts[node_id].kill.remote(pids)
            except Exception:
                pass
        self._pids = {}
