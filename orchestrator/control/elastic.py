"""The sizes an elastic job (`resources.min_workers`) may run at: decided once per job, outside
the pure scheduler, from the spec and the strategy's own layout check."""

from __future__ import annotations

import logging

from strategies import Layout, StrategyConfigError
from strategies.registry import get_strategy_class

from ..spec import JobSpec

log = logging.getLogger(__name__)


def allowed_sizes(spec: JobSpec) -> tuple[int, ...]:
    """Worker counts from min_workers to workers, ascending, that split into the job's colocated
    groups and that the strategy accepts (a hybrid mesh: multiples of pp x tp). Empty for a job
    of fixed size."""
    r = spec.resources
    if r.min_workers is None or r.min_workers >= r.workers:
        return ()
    sizes = [n for n in range(r.min_workers, r.workers + 1) if n % r.colocate == 0]
    try:
        cls = get_strategy_class(spec.strategy.name)
        options = cls.parse_options(spec.strategy.options)
    except Exception:  # e.g. a strategy from the job's working_dir, not importable here
        log.warning("job %s: strategy %r not loadable on the controller; elastic sizes by "
                    "resources.colocate only", spec.name, spec.strategy.name, exc_info=True)
        return tuple(sizes)
    accepted = []
    for n in sizes:
        try:
            cls.validate(Layout(n, r.gpus_per_worker, r.cpus_per_worker), options)
        except StrategyConfigError:
            continue
        accepted.append(n)
    return tuple(accepted)
