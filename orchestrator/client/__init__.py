"""The user's side: the CLI, the Python API, pre-submit checks, following and rendering jobs.

`from orchestrator.client import Client` keeps working; Ray loads only when it is used."""


def __getattr__(name: str):
    if name in ("Client", "run", "submit", "resolve", "as_spec"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
