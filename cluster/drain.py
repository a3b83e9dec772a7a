"""Nodes about to go: `trainctl cluster drain NODE`, and Ray's own draining state.

Draining is Ray's (the GCS node table): a drained node takes no new tasks, actors or bundles,
and whoever reclaims it (an autoscaler acting on a spot instance's notice, `ray drain-node`,
or `trainctl cluster drain`) sets it the same way. So trainctl both asks Ray to drain a node
and reads Ray's list of draining nodes: the jobs on any of them move off (the controller).
"""

from __future__ import annotations

import time

DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # the node goes whether or not it is idle


class UnknownNode(LookupError):
    pass


def resolve(node: str, nodes: list) -> str:
    """The node id of `node`: an alive node's id (or a unique prefix of it) or its IP address.
    `nodes`: cluster.inventory.NodeCapacity (node_id, address)."""
    by_ip = [n.node_id for n in nodes if n.address == node]
    by_id = [n.node_id for n in nodes if n.node_id.startswith(node)]
    found = by_ip or by_id
    if len(found) != 1:
        known = ", ".join(f"{n.address} ({n.node_id[:12]})" for n in nodes) or "none"
        why = "matches several nodes" if found else "is no alive node"
        raise UnknownNode(f"{node!r} {why}; give a node id or IP from `trainctl cluster status` (nodes: {known})")
    return found[0]


def request_drain(node_id: str, message: str, deadline_s: float | None = None) -> tuple[bool, str]:
    """Ask Ray to drain `node_id` (no new work goes there). Returns (accepted, Ray's reason if not)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = 0 if deadline_s is None else int((time.time() + deadline_s) * 1000)
    accepted, rejection = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON),
                                         message, deadline_ms)
    return bool(accepted), rejection or ""


def draining_nodes() -> dict[str, int]:
    """Ray's draining nodes: node id -> deadline (Unix ms; 0: none)."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())
