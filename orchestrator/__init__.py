"""trainctl's orchestrator: job specs, the controller, the CLI and the Python API.

    import orchestrator
    job_id = orchestrator.submit("examples/digits/ddp.yaml")
    final = orchestrator.run(orchestrator.JobSpec(name="x", entrypoint="mod:train"))

    # in a script job (`command:`): metrics without the ctx API; a no-op outside trainctl
    orchestrator.report({"loss": loss, "step": step})
"""

from .control.states import JobState
from .errors import JobNotFound, NonRetryableError, SpecError, UserError

# pydantic loads only when a spec class is used: the CLI's read verbs never need one
_SPEC_NAMES = ("CheckpointSpec", "FailureSpec", "JobSpec", "Resources", "StrategySpec", "load_spec")

__all__ = [
    "CheckpointSpec", "Client", "FailureSpec", "JobNotFound", "JobSpec", "JobState", "NonRetryableError",
    "Resources", "SpecError", "StrategySpec", "TrainContext", "UserError", "load_spec", "report", "run", "submit", "sweep",
]


def __getattr__(name: str):
    if name in _SPEC_NAMES:
        from . import spec

        return getattr(spec, name)
    # Ray and torch load only when the API that needs them is used.
    if name in ("Client", "run", "submit"):
        from .client import api as client

        return getattr(client, name)
    if name == "report":  # stdlib only: a script's `import orchestrator` stays light
        from .runtime.script_report import report

        return report
    if name == "sweep":  # the subpackage, callable: orchestrator.sweep("sweep.yaml") starts a sweep
        import importlib

        return importlib.import_module(".sweep", __name__)
    if name == "TrainContext":
        from .runtime.context import TrainContext

        return TrainContext
    raise AttributeError(name)
