"""One long-lived rank host per node: it forks the jobs' rank processes from a warm zygote.

A new Ray worker process per rank costs ~0.5 CPU-s to start and 1.3-2 CPU-s to `import
torch`. The host (a detached actor of no resources, pinned to its node, found again by name)
owns a *zygote*: a plain subprocess of the node's interpreter that imported torch and the
rank's modules once and forks a fresh rank process per request (cheap, copy-on-write, and no
state of an earlier job: every child is a fork of the clean zygote, never a reused process).
The job's placement group still holds the resources; what the zygote runs is given as a
module name (cluster/ never imports orchestrator).

A rank process has no Ray: it connects to its host's Unix socket, receives its call, pushes
its reports through the host (which forwards them to the job's supervisor and relays the
reply) and sends its result. When the host goes (its node, a crash), the children see the
socket close and kill their own process groups: nothing outlives its host.

Wire and records: cluster/wire.py. The zygote and the child: orchestrator/runtime/zygote.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import wire
from .connect import NAMESPACE

log = logging.getLogger(__name__)

HOST_PREFIX = "trainctl-rank-host-"
# How long a forked child may take to connect back before it counts as dead.
CONNECT_TIMEOUT_S = 60.0
# After a child's result, how long its exit status may take to arrive from the zygote.
EXIT_STATUS_TIMEOUT_S = 10.0
# How long the zygote may take to import what it preloads (torch: seconds on a loaded node).
ZYGOTE_READY_TIMEOUT_S = 120.0
# Set in the zygote only, before its imports: libraries that would otherwise start threads
# at load (OpenBLAS's pool, Arrow's jemalloc background thread); a fork keeps one thread only.
ZYGOTE_ENV = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
# Read when a library loads or the interpreter starts, so a fork of the zygote cannot honour
# them: a job that sets one runs on the classic path (a new Ray worker per rank).
_LOAD_TIME_PREFIXES = ("LD_", "PYTHON", "OPENBLAS_", "GOTO_", "MKL_", "KMP_", "GOMP_", "OMP_", "MALLOC_",
                       "JE_", "ARROW_", "TORCH_", "PYTORCH_")
# ... except these, which the child applies itself (sys.path, torch.set_num_threads) or
# which are read later than the fork.
_HONOURED = {"PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_DISTRIBUTED_DEBUG",
             "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES", "TORCH_HOME", "PYTORCH_CUDA_ALLOC_CONF"}


class WarmStartUnavailable(RuntimeError):
    """The node's zygote cannot fork rank processes (it failed to start, or is not single-threaded)."""


def warm_start_blocker(env_vars: dict[str, str], setting: str | None) -> str | None:
    """Why a job must take the classic path (a new Ray worker per rank), or None for the
    warm one. `setting` is TRAINCTL_WARM_START ("0" turns the warm path off)."""
    if setting is not None and setting.strip().lower() in ("0", "false", "no", "off"):
        return "TRAINCTL_WARM_START=0"
    load_time = sorted(name for name in env_vars
                       if name.startswith(_LOAD_TIME_PREFIXES) and name not in _HONOURED)
    if load_time:
        return f"env {', '.join(load_time)} is read at interpreter or library load, which a fork cannot redo"
    return None


def host_name(node_id: str) -> str:
    return f"{HOST_PREFIX}{node_id}"


def rank_host(node_id: str, zygote_module: str):
    """The node's rank host, created on first use (by whichever caller comes first)."""
    return RankHost.options(
        name=host_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(zygote_module)


def package_cache() -> Path:
    """Per user, 0700: the unpacked working_dirs are the jobs' code."""
    root = Path(tempfile.gettempdir()) / f"trainctl-packages-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def unpack_package(uri: str, data_of, cache: Path) -> Path:
    """The job's working_dir (gcs://_ray_pkg_<content hash>.zip) unpacked once per content
    hash under `cache`; `data_of(uri)` gives the zip's bytes (Ray keeps them in the GCS's KV)."""
    name = uri.split("://", 1)[-1].removesuffix(".zip")
    target = cache / name
    if target.is_dir():
        return target
    data = data_of(uri)
    if data is None:
        raise FileNotFoundError(f"the job's working_dir package {uri} is not in the GCS")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    zip_path = staging.with_suffix(".zip")
    try:
        zip_path.write_bytes(data)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(staging)
        try:
            staging.rename(target)  # atomic: a concurrent unpack of the same hash loses the race cleanly
        except OSError:
            if not target.is_dir():
                raise
    finally:
        zip_path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def child_env(base: dict[str, str], job: dict[str, str], working_dir: str | None) -> dict[str, str]:
    """A rank process's environment: the node's, the job's on top, and PYTHONPATH as Ray's
    working_dir gives it (the working_dir, then the job's PYTHONPATH, then the node's)."""
    env = {**base, **job}
    parts = [working_dir] if working_dir else []
    parts += [p for p in job.get("PYTHONPATH", "").split(os.pathsep) if p]
    parts += [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def _gcs_package(uri: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(uri)


@dataclass(frozen=True)
class RankLaunch:
    """One rank process to fork: what the caller decides (the host adds its socket and the cwd)."""
    token: str
    env: dict[str, str]   # on top of the host's own environment
    threads: int = 1


@dataclass
class _Child:
    token: str
    pid: int | None = None
    forked: asyncio.Future | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None
    relay_to: object = None          # the job's supervisor ref: where pushes go
    result: tuple | None = None      # (ok, payload, text)
    exit_status: int | None = None
    note: str = ""


class RankHostCore:
    """The host's logic, a plain class (unit-tested without Ray); RankHost is it as an actor."""

    def __init__(self, zygote_module: str):
        self.zygote_module = zygote_module
        self.children: dict[str, _Child] = {}
        self.by_pid: dict[int, _Child] = {}
        self.zygote: asyncio.subprocess.Process | None = None
        self.zygote_pid: int | None = None
        self._zygote_ready: asyncio.Future | None = None
        self._start_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self.socket_path: str | None = None
        self._server = None

    # ---- the caller's side ---------------------------------------------------------------
    async def spawn(self, launches: list[RankLaunch], package_uri: str | None) -> list[int]:
        """Fork one rank process per launch; returns their pids (in order)."""
        await self._ensure_running()
        cwd = None
        if package_uri:
            cwd = str(await asyncio.get_running_loop().run_in_executor(
                None, unpack_package, package_uri, _gcs_package, package_cache()))
        children = []
        for launch in launches:
            child = self.children[launch.token] = _Child(launch.token)
            child.forked = asyncio.get_running_loop().create_future()
            children.append(child)
            env = child_env(self._base_env(), launch.env, cwd)
            request = wire.ForkRequest(launch.token, self.socket_path, env, cwd,
                                       [cwd] if cwd else [], launch.threads)
            async with self._write_lock:
                self.zygote.stdin.write(wire.encode(("fork", request)))
                await self.zygote.stdin.drain()
        return [await asyncio.wait_for(c.forked, CONNECT_TIMEOUT_S) for c in children]

    async def run(self, token: str, payload: bytes, relay_to, rank: int) -> wire.RankOutcome:
        """Hand the child its call; returns when it ended (pushes relayed to `relay_to` meanwhile)."""
        child = self.children[token]
        child.relay_to = relay_to
        try:
            await self._first(child.connected, child.exited, CONNECT_TIMEOUT_S)
            if child.connected.is_set() and not child.closed.is_set():
                child.writer.write(wire.encode(("call", payload)))
                await child.writer.drain()
                await self._first(child.closed, child.exited, None)
            if child.result is not None and not child.exited.is_set():
                await self._first(child.exited, child.exited, EXIT_STATUS_TIMEOUT_S)
            elif not child.exited.is_set():  # connection gone, no result: it is dying
                await self._first(child.exited, child.exited, EXIT_STATUS_TIMEOUT_S)
        except (ConnectionError, OSError) as exc:
            child.note = child.note or f"its connection failed: {exc}"
        finally:
            self._forget(child)
        ok, body, text = child.result if child.result is not None else (None, None, "")
        note = child.note
        if child.result is None and not child.exited.is_set():
            note = note or "it neither connected nor exited in time"
            if child.pid is not None:
                _kill_group(child.pid)
        return wire.RankOutcome(child.pid or -1, ok, body, text, child.exit_status, note)

    async def kill(self, pids: list[int]) -> None:
        """SIGKILL these rank processes' groups (their helpers and scripts with them)."""
        for pid in pids:
            _kill_group(pid)

    async def ping(self) -> int:
        return os.getpid()

    async def zygote_info(self) -> dict:
        await self._ensure_running()
        return {"pid": self.zygote_pid, "host_pid": os.getpid(), "socket": self.socket_path}

    # ---- the zygote --------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the rank's own come with its launch
        return env

    async def _ensure_running(self) -> None:
        async with self._start_lock:
            if self._server is None:
                directory = Path(tempfile.gettempdir()) / f"trainctl-{os.getuid()}"
                directory.mkdir(mode=0o700, exist_ok=True)
                self.socket_path = str(directory / f"rh-{os.getpid()}-{secrets.token_hex(3)}.sock")
                self._server = await asyncio.start_unix_server(self._on_connect, path=self.socket_path)
            if self.zygote is None or self.zygote.returncode is not None:
                await self._start_zygote()
        ready = await asyncio.wait_for(asyncio.shield(self._zygote_ready), ZYGOTE_READY_TIMEOUT_S)
        if ready is None:
            raise WarmStartUnavailable("the zygote exited before it was ready (see the rank host's log)")
        if ready > 1:
            raise WarmStartUnavailable(f"the zygote runs {ready} threads after its imports: forking it is not safe")

    async def _start_zygote(self) -> None:
        env = {**self._base_env(), **ZYGOTE_ENV,
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.zygote = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.zygote_module, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=None, env=env, limit=1 << 26)
        self.zygote_pid = self.zygote.pid
        self._zygote_ready = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().create_task(self._read_zygote(self.zygote, self._zygote_ready))
        log.info("rank host %d: zygote %d started", os.getpid(), self.zygote.pid)

    async def _read_zygote(self, proc, ready: asyncio.Future) -> None:
        try:
            while True:
                header = await proc.stdout.readexactly(wire.HEADER_SIZE)
                body = await proc.stdout.readexactly(wire.decode_length(header))
                self._on_zygote_message(wire.pickle.loads(body), ready)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("rank host: reading the zygote failed")
        if not ready.done():
            ready.set_result(None)
        # The zygote is gone: its children cannot be reaped nor told apart any more.
        for child in list(self.children.values()):
            if child.pid is not None:
                _kill_group(child.pid)
            child.note = child.note or "its zygote exited"
            if child.forked is not None and not child.forked.done():
                child.forked.set_exception(WarmStartUnavailable("the zygote exited"))
            child.exited.set()

    def _on_zygote_message(self, message: tuple, ready: asyncio.Future) -> None:
        kind = message[0]
        if kind == "ready":
            ready.set_result(message[2])
        elif kind == "forked":
            child = self.children.get(message[1])
            if child is not None:
                child.pid = message[2]
                self.by_pid[child.pid] = child
                child.forked.set_result(child.pid)
        elif kind == "fork_failed":
            child = self.children.get(message[1])
            if child is not None:
                child.forked.set_exception(WarmStartUnavailable(f"fork failed: {message[2]}"))
        elif kind == "exited":
            child = self.by_pid.get(message[1])
            if child is not None:
                child.exit_status = message[2]
                child.exited.set()

    # ---- the children ------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        child = None
        try:
            hello = await _read_message(reader)
            if not (isinstance(hello, tuple) and hello[0] == "hello") or hello[1] not in self.children:
                writer.close()
                return
            child = self.children[hello[1]]
            child.writer = writer
            child.connected.set()
            while (message := await _read_message(reader)) is not None:
                if message[0] == "push":
                    asyncio.get_running_loop().create_task(self._relay(child, *message[1:]))
                elif message[0] == "result":
                    child.result = tuple(message[1:])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("rank host: a rank's connection failed")
        finally:
            if child is not None:
                child.closed.set()
            writer.close()

    async def _relay(self, child: _Child, seq: int, rank: int, events: list) -> None:
        reply = None
        try:
            reply = await child.relay_to.push.remote(rank, events)
        except ray.exceptions.RayActorError:
            # The job's supervisor is gone: nobody will collect this rank, so it goes too.
            log.warning("rank host: the supervisor of rank %d (pid %s) is gone: killing it", rank, child.pid)
            child.note = "its job's supervisor went away"
            if child.pid is not None:
                _kill_group(child.pid)
            return
        except Exception:
            log.warning("rank host: relaying rank %d's report failed", rank, exc_info=True)
        try:
            child.writer.write(wire.encode(("reply", seq, reply)))
            await child.writer.drain()
        except (ConnectionError, OSError, AttributeError):
            pass

    @staticmethod
    async def _first(a: asyncio.Event, b: asyncio.Event, timeout: float | None) -> None:
        tasks = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    def _forget(self, child: _Child) -> None:
        self.children.pop(child.token, None)
        if child.pid is not None:
            self.by_pid.pop(child.pid, None)


# Detached and restarted (a new zygote) after a crash; no resources: the jobs' placement
# groups hold what their ranks use.
RankHost = ray.remote(num_cpus=0, max_restarts=-1)(RankHostCore)


async def _read_message(reader: asyncio.StreamReader):
    try:
        header = await reader.readexactly(wire.HEADER_SIZE)
        body = await reader.readexactly(wire.decode_length(header))
    except asyncio.IncompleteReadError:
        return None
    return wire.pickle.loads(body)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # each rank process leads its own group (setsid)
    except (ProcessLookupError, PermissionError):
        pass
