"""Gang reservation: one placement group per job, all bundles or nothing."""

from __future__ import annotations

import asyncio

PLACEMENTS = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict_spread": "STRICT_SPREAD",
    "strict_pack": "STRICT_PACK",
}


def bundles(workers: int, cpus_per_worker: float, gpus_per_worker: float, colocate: int = 1) -> list[dict]:
    """One bundle per group of `colocate` workers: Ray places a bundle on one node."""
    bundle = {"CPU": cpus_per_worker * colocate}
    if gpus_per_worker:
        bundle["GPU"] = gpus_per_worker * colocate
    return [dict(bundle) for _ in range(workers // colocate)]


def pg_name(job_id: str) -> str:
    return f"trainctl-pg-{job_id}"


def reserve(job_id: str, workers: int, cpus: float, gpus: float, placement: str, colocate: int = 1):
    """Ask Ray for the whole gang. Detached, so it outlives a restarted controller."""
    from ray.util.placement_group import placement_group

    return placement_group(
        bundles(workers, cpus, gpus, colocate),
        strategy=PLACEMENTS[placement],
        name=pg_name(job_id),
        lifetime="detached",
    )


def find(job_id: str):
    from ray.util import get_placement_group

    try:
        return get_placement_group(pg_name(job_id))
    except ValueError:
        return None


def state(pg) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(pg).get("state", "UNKNOWN")


async def wait_created(pg, timeout_s: float, poll_s: float = 0.2) -> bool:
    """True once every bundle is placed (also after Ray re-places bundles of a lost node).

    Polls fast at first (a gang that fits is placed within milliseconds), then slower."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if state(pg) == "CREATED":
            return True
        waited = loop.time() - start
        if waited >= timeout_s:
            return False
        await asyncio.sleep(0.01 if waited < 0.5 else poll_s)


def release(pg) -> None:
    from ray.util import remove_placement_group

    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # already removed
        pass
