"""What the cluster has: alive nodes with total and free CPUs/GPUs."""

from __future__ import annotations

from dataclasses import dataclass

HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    address: str
    is_head: bool
    cpus: float
    gpus: float
    free_cpus: float
    free_gpus: float
    memory_bytes: float = 0


def nodes() -> list[NodeCapacity]:
    import ray
    from ray._private import state  # the per-node free view `ray status` uses

    free = state.available_resources_per_node()
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        avail = free.get(node["NodeID"], {})
        out.append(NodeCapacity(
            node_id=node["NodeID"],
            address=node.get("NodeManagerAddress", "?"),
            is_head=HEAD_RESOURCE in res,
            cpus=res.get("CPU", 0.0),
            gpus=res.get("GPU", 0.0),
            free_cpus=avail.get("CPU", 0.0),
            free_gpus=avail.get("GPU", 0.0),
            memory_bytes=res.get("memory", 0.0),
        ))
    return sorted(out, key=lambda n: (not n.is_head, n.address, n.node_id))

