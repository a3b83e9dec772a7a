"""The client side of sweeps: read and check the sweep file and its base job (everything a
trial could get wrong at the extremes of the space fails here, as one line, with nothing
created), ship the working_dir once, and talk to the controller."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spec import load_spec, parse_spec
from .post import check_post_training
from .record import SweepState
from .space import base_doc, check_space
from .spec import SweepSpec, load_sweep, parse_sweep

if TYPE_CHECKING:
    from ..client.api import Client


def as_sweep(sweep: SweepSpec | dict | str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Path | None]:
    """The sweep, and the directory its `base` path is relative to (the sweep file's)."""
    if isinstance(sweep, SweepSpec):
        return (parse_sweep(sweep.model_dump(mode="json"), "sweep spec", overrides) if overrides else sweep), None
    if isinstance(sweep, dict):
        return parse_sweep(sweep, "sweep spec", overrides), None
    return load_sweep(sweep, overrides), Path(sweep).resolve().parent


def prepare(sweep: SweepSpec, sweep_dir: Path | None, source: str, base_dir: Path | None = None) -> dict:
    """The resolved base job (as a spec mapping) every trial starts from."""
    from ..client.api import resolve

    if isinstance(sweep.base, str):
        path = Path(sweep.base)
        if not path.is_absolute() and sweep_dir is not None:
            path = sweep_dir / path
        base = load_spec(path)
    else:
        base = parse_spec(sweep.base, f"{source}: base")
    doc = base_doc(base, sweep)
    resolved = resolve(parse_spec(doc, f"{source}: overrides"), base_dir).model_dump(mode="json")
    check_space(sweep, resolved, source)
    check_post_training(sweep, resolved, source, base_dir)
    return resolved


def checked(sweep: SweepSpec | dict | str | Path, overrides: list[str] | None = None,
            base_dir: Path | None = None) -> tuple[SweepSpec, dict]:
    """The sweep and its resolved base job, every check that needs no cluster done."""
    source = str(sweep) if isinstance(sweep, str | Path) else "sweep spec"
    spec, sweep_dir = as_sweep(sweep, overrides)
    return spec, prepare(spec, sweep_dir, source, base_dir)


def submit_sweep(client: Client, spec: SweepSpec, base: dict) -> dict:
    """Start a checked sweep (see `checked`): the working_dir is shipped once for every trial."""
    from cluster import packaging

    from ..client.api import check_against_cluster
    from .tracking import open_parent_run

    check_against_cluster(parse_spec(base))
    package = packaging.package_working_dir(base["working_dir"])
    sweep = spec.model_dump(mode="json")
    open_parent_run(base, sweep)  # with tracking.mlflow: the trials' runs nest under the sweep's
    return client._call("submit_sweep", sweep, base, package)


def wait_sweep(client: Client, sweep_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> dict:
    """Poll until the sweep ends; its status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client._call("sweep_status", sweep_id)
        if SweepState(status["state"]).terminal:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"sweep {sweep_id} still {status['state']} after {timeout_s}s")
        time.sleep(poll_s)


def sweep(spec: SweepSpec | dict | str | Path, address: str | None = None, wait: bool = False,
          overrides: list[str] | None = None) -> Any:
    """Start a sweep on a running cluster: its id (wait=True: its final status)."""
    from ..client.api import Client

    parsed, base = checked(spec, overrides)
    client = Client(address, embedded=wait)
    sweep_id = submit_sweep(client, parsed, base)["id"]
    return wait_sweep(client, sweep_id) if wait else sweep_id

