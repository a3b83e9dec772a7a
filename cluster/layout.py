"""Rank layout: ranks are laid out node by node, rank 0 on the node of bundle 0."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankSlot:
    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    worker_index: int  # which worker actor (= placement group bundle) holds this rank
    node_id: str
    node_ip: str


def gpu_order(gpu_id: str) -> tuple[int, int, str]:
    """Sort key of a Ray GPU id (a string): numbers by value ('2' before '10'), others after."""
    return (0, int(gpu_id), "") if gpu_id.isdigit() else (1, 0, gpu_id)


def lay_out_ranks(worker_nodes: list[tuple[str, str]],
                  worker_gpus: list[list[str]] | None = None) -> list[RankSlot]:
    """worker_nodes[i] = (node_id, node_ip) of worker i, worker_gpus[i] its GPU ids; returns
    one slot per worker, by rank.

    Nodes are ordered by the first worker they hold, so the node of worker 0 is node 0
    and ranks on one node are contiguous (what torchrun does per node). On a node, workers
    are ordered by their lowest GPU id (as Ray Train does), so LOCAL_RANK follows the GPUs.
    """
    node_order: list[str] = []
    by_node: dict[str, list[int]] = {}
    for index, (node_id, _) in enumerate(worker_nodes):
        if node_id not in by_node:
            node_order.append(node_id)
            by_node[node_id] = []
        by_node[node_id].append(index)
    slots = []
    rank = 0
    for node_rank, node_id in enumerate(node_order):
        members = by_node[node_id]
        if worker_gpus:  # stable: workers sharing a GPU (fractions) keep their order
            members = sorted(members, key=lambda i: min(map(gpu_order, worker_gpus[i]), default=(2, 0, "")))
        for local_rank, index in enumerate(members):
            slots.append(RankSlot(
                rank=rank, local_rank=local_rank, local_world_size=len(members),
                node_rank=node_rank, num_nodes=len(node_order), worker_index=index,
                node_id=node_id, node_ip=worker_nodes[index][1],
            ))
            rank += 1
    return slots
