"""`trainctl run|submit [JOB.yaml] [--workers N ...] -- python train.py ARGS`: a job spec from a
command line, with torchrun's own launch flags understood where they map onto trainctl's.

    trainctl run --workers 4 -- python train.py --lr 0.1
    trainctl run -- torchrun --nnodes 2 --nproc-per-node 2 train.py --lr 0.1

--nnodes N --nproc-per-node P become resources.workers = N*P, in N groups of P ranks on one
node each (resources.colocate = P, placement spread when N > 1); --nnodes MIN:MAX makes the
job elastic (resources.min_workers = MIN*P); --max-restarts is failure.max_restarts.
torchrun's rendezvous flags (--standalone, --rdzv-*, --master-*, --node-rank) are dropped:
trainctl places the ranks and picks the master. Pure functions: tested without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError

# torchrun's flags that trainctl accepts -> whether they take a value (rendezvous, logging and
# restart-pacing flags are accepted and dropped: trainctl does those itself)
_TORCHRUN_FLAGS = {"standalone": False, "rdzv-backend": True, "rdzv-endpoint": True, "rdzv-id": True,
            "rdzv-conf": True, "master-addr": True, "master-port": True, "node-rank": True,
            "monitor-interval": True, "start-method": True, "role": True, "log-dir": True,
            "redirects": True, "tee": True, "local-addr": True, "local-ranks-filter": True,
            "log-line-prefix-template": True, "max-restarts": True, "nnodes": True, "nproc-per-node": True,
            "run-path": False, "module": False, "no-python": False}
_TORCH_LAUNCHERS = ("torch.distributed.run", "torch.distributed.launch")


_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
# Interpreter options that take a value: the script is not the next word after them.
_PYTHON_VALUE_OPTIONS = {"-W", "-X", "--check-hash-based-pycs"}


def script_of(command: list[str]) -> str | None:
    """The script file of `python [options] X.py ...`; None for `python -m/-c` or another program."""
    if not command or not _PYTHON.match(Path(command[0]).name):
        return None
    words = iter(command[1:])
    for word in words:
        if word in ("-m", "-c", "-"):
            return None
        if word in _PYTHON_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


@dataclass(frozen=True)
class Launch:
    """What a `torchrun ...` command line asks for."""
    command: list[str]                 # the script's own argv, e.g. [python, train.py, --lr, 0.1]
    nnodes: int | None = None
    min_nnodes: int | None = None      # --nnodes MIN:MAX
    nproc_per_node: int | None = None
    max_restarts: int | None = None


def _torchrun_args(argv: list[str]) -> list[str] | None:
    """The arguments after the launcher when argv is torchrun (or python -m torch.distributed.run)."""
    if argv and Path(argv[0]).name == "torchrun":
        return argv[1:]
    if len(argv) >= 3 and _PYTHON.match(Path(argv[0]).name) and argv[1] == "-m" \
            and argv[2] in _TORCH_LAUNCHERS:
        return argv[3:]
    return None


def _count(flag: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise SpecError(f"command: torchrun {flag} {value!r}: trainctl needs a number of at least 1 "
                        f"(e.g. {flag} 2); it does not detect GPUs for the count")
    return int(value)


def parse_launch(argv: list[str]) -> Launch:
    """A plain command as it is; a torchrun command as the script's argv plus its launch flags."""
    args = _torchrun_args(argv)
    if args is None:
        return Launch(list(argv))
    found: dict[str, Any] = {}
    module = no_python = False
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("-") or word == "--":
            break
        name, eq, inline = word.lstrip("-").replace("_", "-").partition("=")
        if name == "m":
            name = "module"
        if name not in _TORCHRUN_FLAGS:
            raise SpecError(f"command: torchrun option {word!r} is not understood by trainctl; remove it "
                            "(trainctl understands --nnodes, --nproc-per-node, --max-restarts, -m, --no-python)")
        value = None
        if _TORCHRUN_FLAGS[name]:
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise SpecError(f"command: torchrun option {word!r} needs a value")
        i += 1
        if name == "nnodes":
            low, _, high = value.partition(":")
            found["nnodes"] = _count("--nnodes", high or low)
            if high:
                found["min_nnodes"] = _count("--nnodes", low)
        elif name == "nproc-per-node":
            found["nproc_per_node"] = _count("--nproc-per-node", value)
        elif name == "max-restarts":
            if not value.isdigit():
                raise SpecError(f"command: torchrun --max-restarts {value!r}: give a whole number")
            found["max_restarts"] = int(value)
        module |= name == "module"
        no_python |= name == "no-python"
    rest = args[i:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise SpecError("command: torchrun without a script; e.g. torchrun --nproc-per-node 2 train.py")
    if no_python:
        command = rest
    elif module:
        command = ["python", "-m", *rest]
    else:
        command = ["python", *rest]
    return Launch(command, **found)


def default_name(command: list[str]) -> str:
    """The script's stem (train.py -> train; python -m pkg.train -> train), as a valid job name."""
    script = script_of(command)
    if script is None and len(command) >= 3 and command[1] == "-m":
        script = command[2].rpartition(".")[2]
    stem = Path(script or command[0]).stem
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("_.-")[:63]
    return name or "script"


@dataclass(frozen=True)
class ResourceFlags:
    """trainctl's own flags of `run`/`submit` (None: not given)."""
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement: str | None = None
    nnodes: int | None = None
    nproc_per_node: int | None = None
    name: str | None = None


def command_job(doc: dict | None, command: list[str] | None, flags: ResourceFlags) -> dict:
    """The job document: the YAML's (or none), its entrypoint/command replaced by `command`,
    resources from the flags (torchrun's where trainctl's are not given)."""
    doc = dict(doc or {})
    launch = parse_launch(command) if command else Launch([])
    if command:
        doc.pop("entrypoint", None)
        doc["command"] = launch.command
    name = flags.name or (None if "name" in doc else default_name(launch.command) if command else None)
    if name:
        doc["name"] = name
    resources = dict(doc.get("resources") or {})
    nnodes = flags.nnodes or launch.nnodes
    nproc = flags.nproc_per_node or launch.nproc_per_node
    if nnodes or nproc:
        nnodes, nproc = nnodes or 1, nproc or 1
        resources["workers"] = nnodes * nproc
        if nproc > 1:
            resources["colocate"] = nproc  # P ranks on each node, contiguous, as torchrun lays them out
        if nnodes > 1:
            resources["placement"] = "spread"
        if launch.min_nnodes:
            resources["min_workers"] = launch.min_nnodes * nproc
    for key in ("workers", "cpus_per_worker", "gpus_per_worker", "placement"):
        value = getattr(flags, key)
        if value is not None:
            resources[key] = value
    if resources:
        doc["resources"] = resources
    if launch.max_restarts is not None:
        doc["failure"] = {**(doc.get("failure") or {}), "max_restarts": launch.max_restarts}
    return doc
