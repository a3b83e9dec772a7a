"""The CLI's quick verbs' way to the controller: its HTTP API when this cluster publishes one, else Ray.

`trainctl list/status/logs/top` only read and `trainctl cancel` asks one thing of the
controller; over Ray most of their time goes on importing Ray and `ray.init`. A head started
by `trainctl cluster up` has a controller that publishes its HTTP API
(orchestrator/control/http_api.py) in api.json in the head's state directory; when that file
belongs to the cluster this command talks to, the verbs make one local HTTP request instead.
Everything else, and every case where the API does not answer (a stale file, a controller
gone, another cluster), goes the Ray way exactly as before.

Only the standard library here: this is the fast path, it must not import Ray, torch or pyarrow.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
from urllib.parse import quote, urlencode, urlsplit

from ..control.http_api import api_file_for, enabled
from ..errors import JobNotFound, UserError, _rebuild

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0  # loopback: a live server answers in milliseconds
READ_TIMEOUT_S = 60.0  # the controller may be in a slow scheduling tick


class ApiUnavailable(Exception):
    """The API did not answer as our controller would (refused, wrong token, garbage): use Ray."""


class HttpClient:
    """The controller's HTTP API; the same methods and results as api.Client's."""

    def __init__(self, url: str, token: str):
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port
        self.token = token
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, verb: str, path: str, params: dict | None = None):
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None}, doseq=True)
        target = f"/api/v1/{path}" + (f"?{query}" if query else "")
        headers = {"Authorization": f"Bearer {self.token}", "Content-Length": "0"}
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more, anew
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
            try:
                self._conn.request(verb, target, headers=headers)
                self._conn.sock.settimeout(READ_TIMEOUT_S)
                response = self._conn.getresponse()
                body = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # a POST is sent once more only where the server closed the kept-alive
                # connection before reading it; one on a new connection may have been done
                if attempt == 2 or isinstance(exc, (ConnectionRefusedError, TimeoutError)) or \
                        (verb != "GET" and not reused):
                    raise ApiUnavailable(f"{self.url}: {exc}") from None
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiUnavailable(f"{self.url}: answered {response.status} with something not JSON") from None
        if response.status == 200:
            return data
        if not isinstance(data, dict) or response.status in (401, 503) or data.get("kind") == "no_endpoint":
            # not our controller, a busy one, or one of another version: the Ray path decides
            raise ApiUnavailable(f"{self.url}: {response.status} {data}")
        if data.get("kind") == "JobNotFound":
            raise _rebuild(JobNotFound, data["error"])
        if data.get("kind") == "internal":
            raise RuntimeError(f"the controller failed: {data['error']}")
        raise _rebuild(UserError, data.get("error") or f"HTTP {response.status}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ping(self) -> dict:
        return self._request("GET", "ping")

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"jobs/{quote(job_id, safe='')}")

    def list(self, states: list[str] | None = None, ended_since: float | None = None,
             limit: int | None = None) -> list[dict]:
        # all=1: the server applies no "ended in the last day" rule of its own; ended_since is ours
        return self._request("GET", "jobs", {"state": states or None, "ended_since": ended_since,
                                             "limit": limit, "all": 1})

    def read_logs(self, job_id: str, offset: int = 0, rank: int | None = None) -> tuple[str, int]:
        got = self._request("GET", f"jobs/{quote(job_id, safe='')}/logs", {"offset": offset, "rank": rank})
        return got["text"], got["offset"]

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"jobs/{quote(job_id, safe='')}/cancel")


def find_api(address: str | None) -> HttpClient | None:
    """The HTTP API of the cluster that `address` (else RAY_ADDRESS, else `cluster up`'s head)
    names, if that is the `cluster up` head and its controller published one; else None."""
    if not enabled():  # TRAINCTL_API=0: the Ray way, always
        return None
    from cluster.connect import local_cluster  # stdlib only

    try:
        local = local_cluster()
        wanted = address or os.environ.get("RAY_ADDRESS")
        if local is None or not local.get("state") or (wanted and wanted != local["address"]):
            return None  # no api file that we know belongs to the cluster asked for
        path = api_file_for(local["state"])
        info = json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(info, dict) or info.get("cluster") != local["address"] or not info.get("url"):
        return None  # left by a head that ran on the same state directory before
    return HttpClient(info["url"], info["token"])


class ReadClient:
    """`list`, `status`, `logs`, `top` and `cancel` against one cluster: over HTTP while the
    API answers, from the first time it does not on over Ray (api.Client, made then)."""

    def __init__(self, address: str | None):
        self.address = address
        self.http = find_api(address)
        self.ray = None

    @property
    def via(self) -> str:
        return "http" if self.http is not None else "ray"

    def _call(self, http_call, ray_call):
        if self.http is not None:
            try:
                return http_call(self.http)
            except ApiUnavailable as exc:
                log.debug("HTTP API unavailable (%s); using Ray", exc)
                self.http.close()
                self.http = None
        if self.ray is None:
            from .api import Client

            self.ray = Client(self.address)
        return ray_call(self.ray)

    def get(self, job_id: str) -> dict:
        return self._call(lambda h: h.get(job_id), lambda r: r.get(job_id))

    def list(self, states: list[str] | None = None, ended_since: float | None = None,
             limit: int | None = None) -> list[dict]:
        return self._call(lambda h: h.list(states, ended_since, limit), lambda r: r.list(states, ended_since, limit))

    def read_logs(self, job_id: str, offset: int = 0, rank: int | None = None) -> tuple[str, int]:
        # the Ray path hands every rank's lines; the caller filters those (print_log_lines)
        return self._call(lambda h: h.read_logs(job_id, offset, rank), lambda r: r.read_logs(job_id, offset))

    def cancel(self, job_id: str) -> dict:
        """The job's record once cancelled (JobNotFound, or UserError if it already ended)."""
        return self._call(lambda h: h.cancel(job_id), lambda r: r.cancel(job_id))
