"""trainctl's orchestrator: job specs, the controller, the CLI and the Python API.

    import orchestrator
    job_id = orchestrator.submit("examples/digits/ddp.yaml")
    final = orchestrator.run(orchestrator.JobSpec(name="x", entrypoint="mod:train"))
"""

from .control.states import JobState
from .errors import JobNotFound, NonRetryableError, SpecError, UserError
from .spec import CheckpointSpec, FailureSpec, JobSpec, Resources, StrategySpec, load_spec

__all__ = [
    "CheckpointSpec", "Client", "FailureSpec", "JobNotFound", "JobSpec", "JobState", "NonRetryableError",
    "Resources", "SpecError", "StrategySpec", "TrainContext", "UserError", "load_spec", "run", "submit",
]


def __getattr__(name: str):
    # Ray and torch load only when the API that needs them is used.
    if name in ("Client", "run", "submit"):
        from .client import api as client

        return getattr(client, name)
    if name == "TrainContext":
        from .runtime.context import TrainContext

        return TrainContext
    raise AttributeError(name)
