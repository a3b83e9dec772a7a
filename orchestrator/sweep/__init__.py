"""Hyperparameter sweeps whose trials are ordinary queued jobs (issue 17 §1).

spec.py is the sweep file (SweepSpec), space.py turns its parameters into Optuna
distributions and trial job specs, driver.py decides what a sweep does on each controller
tick, service.py keeps the sweeps (table and Optuna study) in the job store's database,
cli.py is `trainctl sweep`.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    """`orchestrator.sweep(spec, address=None, wait=False)` starts a sweep (see api.sweep); the
    name is also this package's, so the package itself is what gets called."""

    def __call__(self, *args, **kwargs):
        from .api import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
