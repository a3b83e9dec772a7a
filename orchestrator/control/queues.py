"""Queues: nominal CPU/GPU quotas, a fair-share weight, whether a queue may borrow idle capacity.

The controller keeps them in the durable store (store.py `trainctl_queues`); this module checks
what a user asks for (`trainctl queue create|set|delete`) and says what each queue holds. The
`default` queue always exists: no quota (the whole cluster), weight 1, may borrow, unless a
`trainctl queue set default ...` stored something else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from typing import Any

from ..errors import UserError
from ..spec import _QUEUE as QUEUE_NAME_PATTERN
from .record import JobRecord
from .scheduler import DEFAULT_QUEUE, QueueQuota

UNCHANGED: Any = object()  # `queue set` leaves a field that was not given as it is


def check_name(name: str) -> str:
    if not re.match(QUEUE_NAME_PATTERN, name or ""):
        raise UserError(f"queue name {name!r}: use 1 to 40 lower-case letters, digits or '-', starting and "
                        "ending with a letter or digit (e.g. research)")
    return name


def parse_amount(value: str | float | None, flag: str) -> float | None:
    """A quota from the command line: a number >= 0, or `none` for no quota."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "unlimited")):
        return None
    try:
        amount = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: give a number of at least 0, or 'none' for no quota") from None
    if not math.isfinite(amount) or amount < 0:
        raise UserError(f"{flag} {value!r}: give a number of at least 0, or 'none' for no quota")
    return amount


def check_weight(weight: float) -> float:
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise UserError(f"--weight {weight!r}: give a number above 0 (a queue of weight 2 gets twice "
                        "the share of a queue of weight 1)")
    return float(weight)


def new_queue(existing: Mapping[str, QueueQuota], name: str, cpus: float | None = None,
              gpus: float | None = None, weight: float = 1.0, borrow: bool = True) -> QueueQuota:
    """`queue create`: a queue that does not exist yet, checked."""
    check_name(name)
    if name == "default" or name in existing:
        raise UserError(f"queue {name} already exists; change it with `trainctl queue set {name}`")
    return QueueQuota(name, parse_amount(cpus, "--cpus"), parse_amount(gpus, "--gpus"), check_weight(weight),
                      bool(borrow))


def changed_queue(existing: Mapping[str, QueueQuota], name: str, cpus: Any = UNCHANGED, gpus: Any = UNCHANGED,
                  weight: Any = UNCHANGED, borrow: Any = UNCHANGED) -> QueueQuota:
    """`queue set`: the queue with the given fields changed."""
    check_name(name)
    queue = existing.get(name) or (DEFAULT_QUEUE if name == "default" else None)
    if queue is None:
        raise UserError(f"no queue {name!r}; create it with `trainctl queue create {name}`")
    changes: dict[str, Any] = {}
    if cpus is not UNCHANGED:
        changes["cpus"] = parse_amount(cpus, "--cpus")
    if gpus is not UNCHANGED:
        changes["gpus"] = parse_amount(gpus, "--gpus")
    if weight is not UNCHANGED:
        changes["weight"] = check_weight(weight)
    if borrow is not UNCHANGED:
        changes["borrow"] = bool(borrow)
    return replace(queue, **changes)


def _unfinished(jobs: Iterable[JobRecord], name: str) -> tuple[int, int]:
    """(waiting, holding resources) jobs of this queue."""
    waiting = holding = 0
    for job in jobs:
        if job.spec.queue != name or job.state.terminal:
            continue
        if job.state.holds_resources:
            holding += 1
        else:
            waiting += 1
    return waiting, holding


def check_delete(existing: Mapping[str, QueueQuota], jobs: Iterable[JobRecord], name: str) -> None:
    check_name(name)
    if name == "default":
        raise UserError("the default queue cannot be deleted (change it with `trainctl queue set default`)")
    if name not in existing:
        raise UserError(f"no queue {name!r}; `trainctl queue list` shows the queues")
    waiting, holding = _unfinished(jobs, name)
    if waiting or holding:
        raise UserError(f"queue {name} still has {waiting} waiting and {holding} running jobs; cancel them "
                        "or let them finish before deleting it")


def check_submit(existing: Mapping[str, QueueQuota], queue: str) -> None:
    """A job names a queue that exists."""
    if queue != "default" and queue not in existing:
        raise UserError(f"queue: no queue {queue!r}; create it with `trainctl queue create {queue}` "
                        "or submit to the default queue")


def with_default(queues: Mapping[str, QueueQuota]) -> dict[str, QueueQuota]:
    return {"default": DEFAULT_QUEUE, **queues}


def describe(queues: Mapping[str, QueueQuota], jobs: Iterable[JobRecord]) -> list[dict]:
    """What `trainctl queue list` shows: each queue's settings, what it holds, its jobs."""
    jobs = list(jobs)
    rows = []
    for name, queue in sorted(with_default(queues).items()):
        used_cpus = used_gpus = 0.0
        for job in jobs:
            if job.spec.queue == name and job.state.holds_resources:
                r = job.spec.resources
                workers = job.workers or r.workers
                used_cpus += workers * r.cpus_per_worker
                used_gpus += workers * r.gpus_per_worker
        waiting, holding = _unfinished(jobs, name)
        rows.append({**asdict(queue), "used_cpus": used_cpus, "used_gpus": used_gpus,
                     "running": holding, "queued": waiting})
    return rows
