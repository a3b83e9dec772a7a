"""The rank host's wire: length-prefixed pickles, and the records it sends (stdlib only).

Spoken between a node's rank host (cluster/rank_host.py), its zygote and the rank processes
the zygote forks (orchestrator/runtime/zygote.py), all on one node and one user.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from dataclasses import dataclass, field

_HEADER = struct.Struct("!I")


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    return _HEADER.unpack(header)[0]


HEADER_SIZE = _HEADER.size


def send(sock: socket.socket, message: object) -> None:
    sock.sendall(encode(message))


def _read_exactly(read, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            return None  # the other side is gone
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> object | None:
    """The next message, or None once the peer closed the connection."""
    header = _read_exactly(sock.recv, HEADER_SIZE)
    body = None if header is None else _read_exactly(sock.recv, decode_length(header))
    return None if body is None else pickle.loads(body)


def write_fd(fd: int, message: object) -> None:
    data = encode(message)
    while data:
        data = data[os.write(fd, data):]


def read_fd(fd: int) -> object | None:
    def read(n: int) -> bytes:
        return os.read(fd, n)
    header = _read_exactly(read, HEADER_SIZE)
    body = None if header is None else _read_exactly(read, decode_length(header))
    return None if body is None else pickle.loads(body)


@dataclass(frozen=True)
class ForkRequest:
    """Host -> zygote: fork one rank process for it."""
    token: str                     # names the child when it connects back
    host_socket: str               # the host's Unix socket the child connects to
    env: dict[str, str]            # the child's whole environment
    cwd: str | None = None         # the job's unpacked working_dir
    sys_path: list[str] = field(default_factory=list)  # put first on the child's sys.path
    threads: int = 1               # torch's intra-op threads (OMP_NUM_THREADS is read at load)


# Zygote -> host: ("ready", pid, threads), ("forked", token, pid), ("fork_failed", token, text),
# ("exited", pid, wait status).
# Child <-> host: child ("hello", token, pid); host ("call", payload); child ("push", seq,
# rank, events); host ("reply", seq, reply or None); child ("result", ok, payload, text).


@dataclass(frozen=True)
class RankOutcome:
    """How a forked rank process ended, as its host saw it (RayWorkerGroup makes a RankExit of it)."""
    pid: int
    ok: bool | None                # True: returned, False: raised, None: no result (it died)
    payload: bytes | None = None   # the pickled value or exception
    text: str = ""                 # the exception's traceback, in case it cannot be unpickled here
    exit_status: int | None = None  # os.waitstatus_to_exitcode: -N killed by signal N
    note: str = ""                 # what the host knows beyond that (its zygote went away, ...)
