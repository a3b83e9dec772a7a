"""The controller's JSON API over HTTP: what the CLI's read verbs and `cancel` ask, without Ray on their side.

Over Ray, `trainctl list` pays ~1.5 s for importing Ray and `ray.init` before its first byte;
over this API it is one local HTTP request. It runs in the controller process, beside the
Prometheus endpoint, on a free port of the metrics host (127.0.0.1 unless
TRAINCTL_METRICS_HOST says otherwise); TRAINCTL_API=0 in the head's environment switches it off.

    GET  /api/v1/ping                               the controller's ping()
    GET  /api/v1/jobs?state=S&limit=N&all=1         job summaries (Controller.list_jobs); without
                                                    state or all: unfinished jobs and those that
                                                    ended in the last day (or since ended_since=T)
    GET  /api/v1/jobs/{id}                          one job's record (Controller.get_job)
    GET  /api/v1/jobs/{id}/logs?offset=B&rank=R     whole log lines from byte B (Controller.read_logs)
    GET  /api/v1/top?all=1                          what `trainctl top` shows: unfinished jobs' summaries
    POST /api/v1/jobs/{id}/cancel                   Controller.cancel: the cancelled job's record (404 for
                                                    an unknown job, 409 for one that already ended)

Every request carries `Authorization: Bearer TOKEN` (else 401). The token is random per
controller; the controller writes it with the URL into `api.json` in its state directory,
readable by its owner only (0600): whoever can read the job store can read the API.

The handlers run in the HTTP server's threads, the controller in its actor's asyncio loop:
every call is a controller coroutine run on that loop (run_coroutine_threadsafe), so no
handler ever touches the job table from another thread.

Only light standard modules are imported here at module level (asyncio and http.server where
they are used): the CLI imports `api_file_for`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import JobNotFound, UserError
from .states import JobState

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

API_FILE = "api.json"
PREFIX = "/api/v1"
RECENT_S = 24 * 3600  # `list` shows jobs that ended this recently, besides unfinished ones
CALL_TIMEOUT_S = 30.0  # a controller coroutine that takes longer answers 503 (the CLI falls back to Ray)
UNFINISHED = [s.value for s in JobState if not s.terminal]
# store.StateLocation.parse keeps a PostgreSQL head's files (logs, this file) here
_POSTGRES_FILES = "~/.trainctl/state"


def enabled() -> bool:
    return os.environ.get("TRAINCTL_API", "1").lower() not in ("0", "false", "no", "off")


def api_file_for(state: str) -> Path:
    """Where the controller of a head whose TRAINCTL_STATE is `state` writes api.json: its
    files directory, by store.StateLocation.parse's rule (not imported: it brings SQLAlchemy
    and pydantic into the CLI; tests check the two agree)."""
    if state.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return Path(_POSTGRES_FILES).expanduser() / API_FILE
    return Path(state).expanduser() / API_FILE


def write_api_file(path: Path, info: dict) -> None:
    """Owner-only from its first byte (created 0600, then renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        # a client of another version may ask for what this one lacks: it then asks over Ray
        self.kind = "no_endpoint" if status in (404, 405) else "bad_request"


@dataclass(frozen=True)
class Route:
    """A parsed request: which controller call, with which arguments."""

    method: str  # the Controller coroutine
    args: tuple
    rank: int | None = None  # logs: only this rank's lines


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _number(query, name: str, kind: Callable, minimum: float | None = None):
    raw = _one(query, name)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise HttpError(400, f"{name}={raw!r} is not a {kind.__name__}") from None
    if minimum is not None and value < minimum:
        raise HttpError(400, f"{name}={raw!r} must be at least {minimum:g}")
    return value


def _flag(query, name: str) -> bool:
    return (_one(query, name) or "").lower() in ("1", "true", "yes", "on")


def _states(query) -> list[str] | None:
    states = [s.upper() for raw in query.get("state", []) for s in raw.split(",") if s]
    unknown = sorted(set(states) - {s.value for s in JobState})
    if unknown:
        raise HttpError(400, f"state={unknown[0]!r} is not a job state; one of {', '.join(s.value for s in JobState)}")
    return states or None


def route(verb: str, url: str, now: float) -> Route:
    """The controller call a request asks for (HttpError: a bad path or parameter)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    path = parts.path.rstrip("/")
    if not path.startswith(PREFIX + "/"):
        raise HttpError(404, f"no such endpoint {parts.path!r}")
    segments = [unquote(s) for s in path[len(PREFIX) + 1:].split("/")]
    if verb == "POST":
        if len(segments) == 3 and segments[0] == "jobs" and segments[2] == "cancel":
            return Route("cancel", (segments[1],))
        raise HttpError(405, f"cannot POST {parts.path!r}")
    if segments == ["ping"]:
        return Route("ping", ())
    if segments == ["top"]:
        return Route("list_jobs", (None if _flag(query, "all") else UNFINISHED, None, None))
    if segments == ["jobs"]:
        states = _states(query)
        ended_since = _number(query, "ended_since", float)
        if ended_since is None and not states and not _flag(query, "all"):
            ended_since = now - RECENT_S
        return Route("list_jobs", (states, ended_since, _number(query, "limit", int, minimum=1)))
    if len(segments) == 2 and segments[0] == "jobs":
        return Route("get_job", (segments[1],))
    if len(segments) == 3 and segments[0] == "jobs" and segments[2] == "logs":
        offset = _number(query, "offset", int, minimum=0) or 0
        return Route("read_logs", (segments[1], offset), rank=_number(query, "rank", int, minimum=0))
    raise HttpError(404, f"no such endpoint {parts.path!r}")


def only_rank(text: str, rank: int | None) -> str:
    """The lines of one rank (`[rank N] ...`, as the workers prefix them); all lines for None."""
    if rank is None:
        return text
    prefix = f"[rank {rank}] "
    return "".join(line for line in text.splitlines(keepends=True) if line.startswith(prefix))


class ControllerApi:
    """The HTTP server: a thread of its own; each request runs a controller coroutine on `loop`."""

    def __init__(self, controller, loop: asyncio.AbstractEventLoop, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, call_timeout_s: float = CALL_TIMEOUT_S):
        self.controller = controller
        self.loop = loop
        self.token = token or secrets.token_urlsafe(32)
        self.call_timeout_s = call_timeout_s
        import socket
        from http.server import ThreadingHTTPServer

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.server = Server((host, port), _handler(self))
        host, port = self.server.server_address[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="trainctl-api", daemon=True)
        self._thread.start()

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token.encode())

    def answer(self, verb: str, url: str) -> tuple[int, object]:
        """(status, JSON body) for an authorized request."""
        import asyncio  # here, not at the top: the CLI imports this module and never needs it

        try:
            call = route(verb, url, time.time())
            future = asyncio.run_coroutine_threadsafe(getattr(self.controller, call.method)(*call.args), self.loop)
            try:
                result = future.result(self.call_timeout_s)
            except TimeoutError:
                future.cancel()
                raise
        except HttpError as exc:
            return exc.status, {"error": str(exc), "kind": exc.kind}
        except JobNotFound as exc:
            return 404, {"error": str(exc), "kind": "JobNotFound"}
        except UserError as exc:  # e.g. cancelling a job that already ended
            return 409, {"error": str(exc), "kind": "UserError"}
        except TimeoutError:
            return 503, {"error": f"the controller did not answer within {self.call_timeout_s:g}s", "kind": "busy"}
        except Exception as exc:
            log.exception("HTTP API: %s %s failed", verb, url)
            return 500, {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}
        if call.method == "read_logs":
            text, offset = result
            return 200, {"text": only_rank(text, call.rank), "offset": offset}
        return 200, result  # the controller hands out plain JSON (JobRecord.to_json, summaries)

    def info(self, cluster: str | None) -> dict:
        """What api.json holds: where to connect and with what token, for which Ray cluster."""
        return {"url": self.url, "token": self.token, "cluster": cluster, "pid": os.getpid()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(api: ControllerApi):
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a follower polls on one connection
        timeout = 300  # an idle kept-alive connection ends (and its thread); the client reconnects

        def _respond(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="trainctl"')
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, verb: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)  # no endpoint takes a body; drain it for keep-alive
            if not api.authorized(self.headers.get("Authorization")):
                self._respond(401, {"error": "missing or wrong bearer token (see api.json in the "
                                             "controller's state directory)", "kind": "unauthorized"})
                return
            self._respond(*api.answer(verb, self.path))

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            log.debug("HTTP API %s: " + format, self.address_string(), *args)

    return Handler


def start_api(controller, state_dir: Path, host: str = "127.0.0.1", cluster: str | None = None,
              port: int = 0) -> ControllerApi | None:
    """Serve the API for `controller` and publish it in `state_dir`/api.json. Call it from
    the actor's event loop (an async actor's __init__ runs there): that loop runs the calls.
    None when switched off (TRAINCTL_API=0), or when it cannot start (the CLI then uses Ray)."""
    if not enabled():
        return None
    import asyncio

    try:
        api = ControllerApi(controller, asyncio.get_running_loop(), host, port)
    except (RuntimeError, OSError):
        log.exception("the HTTP API did not start; clients go through Ray")
        return None
    try:
        write_api_file(Path(state_dir) / API_FILE, api.info(cluster))
    except OSError:
        log.exception("cannot write %s; clients go through Ray", Path(state_dir) / API_FILE)
        api.close()
        return None
    return api
