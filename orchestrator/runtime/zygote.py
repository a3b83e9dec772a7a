"""The zygote a node's rank host forks rank processes from, and the rank process's side.

    python -m orchestrator.runtime.zygote     (started by cluster/rank_host.py, never by hand)

The zygote imports what every rank needs (torch, numpy, pyarrow, strategies, this package's
runtime) once, checks it is single-threaded (a fork copies one thread only: a lock held by
another would stay locked in the child), and then serves fork requests on its stdin
(cluster/wire.py), reporting each child's pid and, when it is reaped, its wait status.

A child (one rank of one attempt): its own session and process group, the job's environment,
its working_dir as cwd and first on sys.path, torch's threads; it connects to the host's
socket, receives its call (function and arguments, pickled), runs it and sends the result.
Its reports travel through the same connection (HostRelay, a reporting.PushChannel). When
the connection closes (the host or its node went), the child kills its own process group.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import importlib
import itertools
import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import traceback

from cluster import wire

# Imported once here so that no rank imports them again. torch._dynamo: a rank's first
# torch.optim optimizer imports it (800 modules, sympy among them): 1.1 s of every launch here.
PRELOAD = ("torch", "torch._dynamo", "numpy", "pyarrow", "strategies", "orchestrator.runtime.worker_entry",
           "orchestrator.runtime.script", "orchestrator.runtime.context", "orchestrator.runtime.checkpoint",
           "orchestrator.data.loader")


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def preload(modules=PRELOAD) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional part missing on this node: the rank imports it if it needs it
            print(f"[trainctl zygote] could not preload {name}: {exc}", file=sys.stderr, flush=True)


# ---- the zygote ------------------------------------------------------------------------------

def serve(request_fd: int, reply_fd: int) -> None:
    """Fork on request until the host closes `request_fd`."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd is written
    signal.set_wakeup_fd(wake_w)
    own_fds = (request_fd, reply_fd, wake_r, wake_w)
    wire.write_fd(reply_fd, ("ready", os.getpid(), thread_count()))
    while True:
        readable, _, _ = select.select([request_fd, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(reply_fd)
        if request_fd in readable:
            message = wire.read_fd(request_fd)
            if message is None:  # the host is gone; its children notice on their own sockets
                return
            if message[0] == "fork":
                request: wire.ForkRequest = message[1]
                try:
                    pid = os.fork()
                except OSError as exc:
                    wire.write_fd(reply_fd, ("fork_failed", request.token, str(exc)))
                    continue
                if pid == 0:
                    _child_main(request, own_fds)  # never returns
                wire.write_fd(reply_fd, ("forked", request.token, pid))
        _reap(reply_fd)  # a SIGCHLD during the fork request may have been taken by the select


def _reap(reply_fd: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        wire.write_fd(reply_fd, ("exited", pid, os.waitstatus_to_exitcode(status)))


def main() -> None:
    # fds 0 and 1 are the host's pipes: keep them apart, so that nothing printed (by us or by a
    # rank, which inherits fds 1 and 2) can corrupt the protocol
    request_fd, reply_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    preload()
    # what was imported is never garbage: no rank's full collection walks (and so copies) it
    gc.freeze()
    serve(request_fd, reply_fd)


# ---- the child -----------------------------------------------------------------------------

def _child_main(request: wire.ForkRequest, inherited_fds: tuple[int, ...]) -> None:
    code = 1
    try:
        for fd in inherited_fds:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # its own group: the host kills the rank and whatever it started as one
        prepare_child(request)
        code = run_child(request)
    except BaseException:
        traceback.print_exc()
    finally:
        _flush()
        os._exit(code)


def prepare_child(request: wire.ForkRequest) -> None:
    """The job's environment, cwd, sys.path and threads, in this (forked) process."""
    os.environ.clear()
    os.environ.update(request.env)
    if request.cwd:
        os.chdir(request.cwd)
    for path in reversed(request.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    for path in reversed([p for p in request.env.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if path not in sys.path:
            sys.path.insert(1 if request.sys_path else 0, path)
    torch = sys.modules.get("torch")
    if torch is not None:  # OMP_NUM_THREADS was read when the zygote loaded libgomp
        torch.set_num_threads(max(1, request.threads))


def run_child(request: wire.ForkRequest) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(request.host_socket)
    relay = HostRelay(sock)
    relay.send(("hello", request.token, os.getpid()))
    fn, args = pickle.loads(relay.next_call())
    args = tuple(_with_relay(arg, relay) for arg in args)
    try:
        value = fn(*args)
    except BaseException as exc:  # the attempt loop classifies it, as for any rank's exception
        text = "".join(traceback.format_exception(exc))
        relay.send(("result", False, _dumps(exc), text))
        return 0
    relay.send(("result", True, pickle.dumps(value), ""))
    return 0


def _dumps(exc: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # an exception whose __init__ takes other arguments fails only here
        return data
    except Exception:
        return None


def _with_relay(arg, relay: HostRelay):
    """The rank's task names no supervisor (an actor handle means nothing here): its reports go to the host."""
    from .worker_entry import RankTask

    if isinstance(arg, RankTask) and arg.supervisor is None:
        return dataclasses.replace(arg, supervisor=relay)
    return arg


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


class HostRelay:
    """The child's connection to its rank host: its call comes in, its reports go out (a
    reporting.PushChannel), its result goes back. If the host goes, so does the child."""

    def __init__(self, sock: socket.socket, on_host_gone=None):
        self.sock = sock
        self.on_host_gone = on_host_gone or _kill_own_group
        self._send_lock = threading.Lock()
        self._calls: queue.Queue = queue.Queue()
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._seq = itertools.count()
        self._reader = threading.Thread(target=self._read, name="trainctl-host-relay", daemon=True)
        self._reader.start()

    def send(self, message: tuple) -> None:
        with self._send_lock:
            wire.send(self.sock, message)

    def next_call(self) -> bytes:
        call = self._calls.get()
        if call is None:
            raise ConnectionError("the rank host closed the connection before sending the call")
        return call

    def _read(self) -> None:
        while True:
            try:
                message = wire.recv(self.sock)
            except OSError:
                message = None
            if message is None:
                self._calls.put(None)
                self.on_host_gone()
                return
            if message[0] == "call":
                self._calls.put(message[1])
            elif message[0] == "reply":
                future = self._replies.pop(message[1], None)
                if future is not None:
                    future.set_result(message[2])

    # ---- reporting.PushChannel ----
    def push(self, rank: int, events: list) -> concurrent.futures.Future:
        seq = next(self._seq)
        future = self._replies[seq] = concurrent.futures.Future()
        self.send(("push", seq, rank, events))
        return future

    def replies(self, pending: list, wait: bool) -> tuple[list, list]:
        done, rest = concurrent.futures.wait(pending, timeout=30 if wait else 0)
        if wait and rest:
            raise TimeoutError("the rank host did not answer the last reports within 30 s")
        return [f.result() for f in pending if f in done], [f for f in pending if f in rest]


def _kill_own_group() -> None:
    os.killpg(0, signal.SIGKILL)  # this process and all it started: nobody collects them now


if __name__ == "__main__":
    main()
