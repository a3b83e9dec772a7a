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


def lay_out_ranks(worker_nodes: list[tuple[str, str]]) -> list[RankSlot]:
    """worker_nodes[i] = (node_id, node_ip) of worker i; returns one slot per worker, by rank.

    Nodes are ordered by the first worker they hold, so the node of worker 0 is node 0
    and ranks on one node are contiguous (what torchrun does per node).
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
        for local_rank, index in enumerate(members):
            slots.append(RankSlot(
                rank=rank, local_rank=local_rank, local_world_size=len(members),
                node_rank=node_rank, num_nodes=len(node_order), worker_index=index,
                node_id=node_id, node_ip=worker_nodes[index][1],
            ))
            rank += 1
    return slots
