"""Python stacks of running (or frozen) processes on any node, with py-spy.

A zero-CPU Ray task pinned to the process's node runs `py-spy dump --nonblocking
--subprocesses` (which reads a process's memory without stopping it, so it also works on one
frozen by SIGSTOP) on the pid it is given: that process and every Python process below it.

Which main thread speaks for the process (the hang cause's `in all_reduce (train.py:42)`):
the given process's own, unless it runs a program under a wrapper (a script job's rank runs
its command under orchestrator/runtime/script_guard.py): then the wrapped program's, the
Python that really hangs, not the rank's wait for it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

DUMP_TIMEOUT_S = 20.0
# Frames in these places are library code; the first frame outside them is the user's.
_LIBRARY = re.compile(r"(site-packages|dist-packages|/lib/python3\.\d+/|^<frozen |/orchestrator/|/strategies/)")
_COLLECTIVES = {"all_reduce", "allreduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "barrier", "all_to_all", "recv", "send", "wait",
                "synchronize", "monitored_barrier"}
_FRAME = re.compile(r"^\s+(?P<function>\S.*?) \((?P<where>[^()]*)\)\s*$")
_PROCESS = re.compile(r"^Process (?P<pid>\d+): (?P<command>.*)$")
_PARENT = re.compile(r"^Parent Process (?P<pid>\d+): ")
# Command-line marks of wrappers whose child is the program that matters (cluster/ imports
# nothing of orchestrator/: tests/multiprocess/test_script_unit.py checks this names its script guard).
WRAPPERS = ("script_guard.py",)


@dataclass(frozen=True)
class Frame:
    function: str
    where: str  # file:line


@dataclass(frozen=True)
class ProcessStack:
    """One process's part of a `py-spy dump --subprocesses`."""

    pid: int
    command: str
    parent: int | None  # None for the process dumped (py-spy names no parent for it)
    main_thread: tuple[Frame, ...]  # innermost first

    def wrapper(self) -> bool:
        return any(mark in self.command for mark in WRAPPERS)


@dataclass(frozen=True)
class StackDump:
    pid: int
    text: str  # py-spy's output, or why there is none
    main_thread: tuple[Frame, ...] = ()  # innermost first: the speaking process's (see the module doc)
    main_pid: int | None = None  # whose main thread that is: `pid`, or the program under its wrapper

    def in_collective(self) -> bool:
        """Waiting in a collective: a peer of the rank that hangs, rather than the one that does."""
        return any(f.function in _COLLECTIVES for f in self.main_thread)

    def summary(self) -> str:
        """e.g. `in all_reduce (train.py:42)`: the innermost call and the user's line that led to it."""
        if not self.main_thread:
            return "stack unavailable"
        innermost = self.main_thread[0]
        user = next((f for f in self.main_thread if not _LIBRARY.search(f.where)), innermost)
        return f"in {innermost.function} ({_short(user.where)})"


def _short(where: str) -> str:
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{line}" if path else where


def parse_main_thread(text: str, pid: int | None = None) -> tuple[Frame, ...]:
    """The frames of the main thread in `py-spy dump` output, innermost first: the thread
    named "MainThread", or (threading never imported, so no names) the one whose id is the pid,
    or else the first."""
    threads: list[tuple[str, list[Frame]]] = []
    for line in text.splitlines():
        if line.startswith("Thread "):
            threads.append((line, []))
        elif threads and (match := _FRAME.match(line)):
            threads[-1][1].append(Frame(match["function"], match["where"]))
    if not threads:
        return ()
    for header, frames in threads:
        if '"MainThread"' in header or (pid is not None and header.split()[1] == str(pid)):
            return tuple(frames)
    return tuple(threads[0][1])


def parse_processes(text: str) -> list[ProcessStack]:
    """Every process in `py-spy dump --subprocesses` output, in py-spy's order."""
    sections: list[tuple[int, str, list[str]]] = []
    for line in text.splitlines():
        if match := _PROCESS.match(line):
            sections.append((int(match["pid"]), match["command"], []))
        elif sections:
            sections[-1][2].append(line)
    stacks = []
    for pid, command, lines in sections:
        parent = next((int(m["pid"]) for line in lines if (m := _PARENT.match(line))), None)
        stacks.append(ProcessStack(pid, command, parent, parse_main_thread("\n".join(lines), pid)))
    return stacks


def speaking_process(processes: list[ProcessStack], pid: int) -> ProcessStack | None:
    """The process whose main thread stands for `pid`'s (see the module doc): the program a
    wrapper below `pid` runs (a child of the wrapper that is no wrapper itself, e.g. not
    script_guard's keeper), else `pid` itself. A program started through something py-spy
    cannot read (`sh -c`) has a parent that is not in the dump: it counts as wrapped too."""
    by_pid = {p.pid: p for p in processes}
    root = by_pid.get(pid)
    wrappers = {p.pid for p in processes if p.pid != pid and p.wrapper()}
    if not wrappers:
        return root
    programs = [p for p in processes if p.pid != pid and not p.wrapper()]
    under = [p for p in programs if p.parent in wrappers] or [p for p in programs if p.parent not in by_pid]
    return min(under, key=lambda p: p.pid) if under else root


def py_spy_binary() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def dump_local(pid: int, timeout_s: float = DUMP_TIMEOUT_S) -> StackDump:
    """`pid`'s stack and its Python descendants', read here (see the module doc)."""
    binary = py_spy_binary()
    if binary is None:
        return StackDump(pid, "py-spy is not installed (pip install py-spy)")
    deadline = time.monotonic() + timeout_s
    result = None
    # a child that exits while py-spy reads it can fail the whole dump: then the pid alone
    for extra in (["--subprocesses"], []):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            result = subprocess.run([binary, "dump", "--nonblocking", "--full-filenames", *extra, "--pid", str(pid)],
                                    capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return StackDump(pid, f"py-spy timed out after {timeout_s:g} s")
        if result.returncode == 0:
            break
    if result is None or result.returncode != 0:
        reason = ((result.stderr if result else "").strip().splitlines() or ["failed"])[0]
        return StackDump(pid, f"py-spy could not read pid {pid}: {reason}")
    return stack_dump(pid, result.stdout)


def stack_dump(pid: int, text: str) -> StackDump:
    """A StackDump of py-spy's output for `pid` (with or without --subprocesses)."""
    speaking = speaking_process(parse_processes(text), pid)
    if speaking is None:  # no "Process N:" header to go by
        return StackDump(pid, text, parse_main_thread(text, pid), pid)
    return StackDump(pid, text, speaking.main_thread, speaking.pid)


@ray.remote(num_cpus=0, max_retries=0)
def _dump_on_node(pid: int, timeout_s: float) -> StackDump:
    return dump_local(pid, timeout_s)


async def dump_stacks(targets: list[tuple[str, int]], timeout_s: float = DUMP_TIMEOUT_S) -> list[StackDump]:
    """The stacks of (node_id, pid) processes, each read on its own node, concurrently; in order."""

    async def one(node_id: str, pid: int) -> StackDump:
        ref = _dump_on_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pid, timeout_s)
        try:
            return await asyncio.wait_for(ref, timeout_s + 30)
        except Exception as exc:  # the node is gone or unreachable: say so, keep the others
            ray.cancel(ref, force=True)
            return StackDump(pid, f"could not reach the rank's node: {type(exc).__name__}")

    return list(await asyncio.gather(*(one(node_id, pid) for node_id, pid in targets)))
