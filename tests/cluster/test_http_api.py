"""The controller's HTTP API and the CLI's read verbs over it (issue 14 §4).

Unit tests serve the real ControllerApi over a fake controller (a few async methods on a real
asyncio loop in a thread, as a Ray async actor has); the cluster tests at the end run the
real thing on a head started by `trainctl cluster up`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.control.http_api import (
    API_FILE,
    RECENT_S,
    UNFINISHED,
    api_file_for,
    route,
    start_api,
)

from ..helpers import REPO, trainctl, wait_for

pytestmark = pytest.mark.timeout(120)

CLUSTER = "127.0.0.1:6399"  # the Ray address the fake's api.json and cluster.json name

JOB = {"id": "toy-abc123", "name": "toy", "state": "SUCCEEDED", "priority": 0, "submitted_at": 1000.0,
       "spec": {"strategy": {"name": "ddp"}, "resources": {"workers": 2, "cpus_per_worker": 1.0,
                                                         "gpus_per_worker": 0.0, "placement": "spread"}},
       "history": [{"state": "QUEUED", "at": 1000.0, "note": ""}], "placement": [], "restarts": [],
       "metrics": {"loss": 0.25}, "progress": {"step": 10, "total_steps": 10}, "error": None, "health": {}}
SUMMARY = {"id": JOB["id"], "name": "toy", "state": "SUCCEEDED", "priority": 0, "strategy": "ddp", "workers": 2,
           "progress": {"step": 10, "total_steps": 10}, "submitted_at": 1000.0, "ended_at": 1010.0,
           "queue_reason": None, "error": None, "restarts": 0, "health": {}}
LOG = "[rank 0] hello\n[rank 1] world\n[rank 0] bye\n"
RUNNING = {**JOB, "id": "long-def456", "name": "long", "state": "RUNNING"}  # the one job cancel can stop


class FakeController:
    """The coroutines the API calls, recording their arguments and the thread they ran on."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.threads: set[str] = set()

    def _called(self, *call):
        self.calls.append(call)
        self.threads.add(threading.current_thread().name)

    async def ping(self):
        self._called("ping")
        return {"jobs": 1}

    async def list_jobs(self, states=None, ended_since=None, limit=None):
        self._called("list_jobs", states, ended_since, limit)
        return [SUMMARY]

    async def get_job(self, job_id):
        self._called("get_job", job_id)
        if job_id != JOB["id"]:
            from orchestrator.errors import JobNotFound

            raise JobNotFound(job_id)
        return JOB

    async def read_logs(self, job_id, offset=0):
        self._called("read_logs", job_id, offset)
        await self.get_job(job_id)
        data = LOG.encode()[offset:]
        return data.decode(), offset + len(data)

    async def cancel(self, job_id):
        self._called("cancel", job_id)
        from orchestrator.errors import UserError

        if job_id == RUNNING["id"]:
            return {**RUNNING, "state": "CANCELLED"}
        await self.get_job(job_id)  # JobNotFound for an unknown id
        raise UserError(f"job {job_id} already ended (SUCCEEDED); nothing to cancel")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real ControllerApi over FakeController, started from its loop's thread as the actor does."""
    state = tmp_path_factory.mktemp("state")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-actor-loop", daemon=True)
    thread.start()
    controller = FakeController()

    async def start():
        return start_api(controller, state, cluster=CLUSTER)

    api = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield api, controller, state
    api.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _get(url: str, token: str | None = None, method: str = "GET"):
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _api_info(state: Path) -> dict:
    return json.loads((state / API_FILE).read_text())


# ---- the server ------------------------------------------------------------------------------

def test_the_api_file_is_owner_only_and_names_a_loopback_url(served):
    api, _, state = served
    path = state / API_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = _api_info(state)
    assert info["url"] == api.url and info["token"] == api.token and info["cluster"] == CLUSTER
    assert info["url"].startswith("http://127.0.0.1:")
    assert api.server.server_address[0] == "127.0.0.1"  # bound to loopback, not 0.0.0.0
    assert len(api.token) >= 32


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_a_request_without_the_token_is_401(served, token):
    api, controller, _ = served
    before = len(controller.calls)
    for path in ("/api/v1/jobs", f"/api/v1/jobs/{JOB['id']}", "/api/v1/nosuch", "/"):
        status, body = _get(api.url + path, token)
        assert status == 401, (path, status, body)
    assert _get(api.url + f"/api/v1/jobs/{JOB['id']}/cancel", token, method="POST")[0] == 401
    assert len(controller.calls) == before  # nothing reached the controller


def test_every_call_runs_on_the_controllers_loop(served):
    api, controller, _ = served
    controller.threads.clear()
    for path in ("ping", "jobs", f"jobs/{JOB['id']}", f"jobs/{JOB['id']}/logs", "top"):
        status, body = _get(f"{api.url}/api/v1/{path}", api.token)
        assert status == 200, (path, body)
    assert controller.threads == {"fake-actor-loop"}  # never an HTTP handler thread


def test_endpoints_return_what_the_controller_returns(served):
    api, controller, _ = served
    assert _get(f"{api.url}/api/v1/jobs/{JOB['id']}", api.token) == (200, JOB)
    assert _get(f"{api.url}/api/v1/jobs?state=running,queued&state=FAILED&limit=3", api.token) == (200, [SUMMARY])
    assert controller.calls[-1] == ("list_jobs", ["RUNNING", "QUEUED", "FAILED"], None, 3)
    assert _get(f"{api.url}/api/v1/top", api.token) == (200, [SUMMARY])
    assert controller.calls[-1] == ("list_jobs", UNFINISHED, None, None)
    _get(f"{api.url}/api/v1/top?all=1", api.token)
    assert controller.calls[-1] == ("list_jobs", None, None, None)
    assert _get(f"{api.url}/api/v1/jobs/{JOB['id']}/logs?rank=0", api.token) == \
        (200, {"text": "[rank 0] hello\n[rank 0] bye\n", "offset": len(LOG)})
    assert _get(f"{api.url}/api/v1/jobs/{JOB['id']}/logs?offset=15", api.token) == \
        (200, {"text": LOG[15:], "offset": len(LOG)})


def test_errors_are_json_with_the_controllers_message(served):
    api, _, _ = served
    status, body = _get(f"{api.url}/api/v1/jobs/no-such-job", api.token)
    assert status == 404 and body["kind"] == "JobNotFound" and "no job 'no-such-job'" in body["error"]
    status, body = _get(f"{api.url}/api/v1/jobs/{JOB['id']}/cancel", api.token, method="POST")
    assert status == 409 and "already ended" in body["error"]
    status, body = _get(f"{api.url}/api/v1/jobs/no-such-job/cancel", api.token, method="POST")
    assert status == 404 and body["kind"] == "JobNotFound"
    assert _get(f"{api.url}/api/v1/jobs?limit=lots", api.token)[0] == 400
    assert _get(f"{api.url}/api/v1/jobs?state=DONE", api.token)[0] == 400
    assert _get(f"{api.url}/api/v1/nosuch", api.token) == \
        (404, {"error": "no such endpoint '/api/v1/nosuch'", "kind": "no_endpoint"})
    assert _get(f"{api.url}/api/v1/jobs", api.token, method="POST")[0] == 405


def test_list_without_state_or_all_shows_the_last_day():
    assert route("GET", "/api/v1/jobs", now=10_000_000.0).args == (None, 10_000_000.0 - RECENT_S, None)
    assert route("GET", "/api/v1/jobs?all=1", now=1.0).args == (None, None, None)
    assert route("GET", "/api/v1/jobs?ended_since=5.5&limit=2", now=1.0).args == (None, 5.5, 2)
    assert route("GET", "/api/v1/jobs?state=QUEUED", now=1.0).args == (["QUEUED"], None, None)


def test_the_api_file_sits_where_the_store_keeps_the_heads_files(tmp_path):
    from orchestrator.control.store import StateLocation

    for state in (str(tmp_path / "state"), "postgresql://u:p@127.0.0.1:5432/db"):
        assert api_file_for(state) == StateLocation.parse(state).files / API_FILE


def test_switched_off_there_is_no_api_and_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINCTL_API", "0")

    async def start():
        return start_api(FakeController(), tmp_path, cluster=CLUSTER)

    assert asyncio.run(start()) is None
    assert not (tmp_path / API_FILE).exists()


# ---- the client ------------------------------------------------------------------------------

def _register_cluster(home: Path, state: Path, address: str = CLUSTER) -> None:
    """What `trainctl cluster up` leaves in TRAINCTL_HOME; our pid stands in for the head's."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "cluster.json").write_text(json.dumps({"address": address, "pid": os.getpid(), "state": str(state)}))


def test_find_api_only_for_the_cluster_the_file_belongs_to(served, tmp_path, monkeypatch):
    from orchestrator.client.http import find_api

    api, _, state = served
    home = Path(os.environ["TRAINCTL_HOME"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert find_api(None) is None  # no `cluster up` head
    _register_cluster(home, state)
    assert find_api(None).url == api.url
    assert find_api(CLUSTER).url == api.url  # --address naming that head
    assert find_api("10.0.0.9:6379") is None  # another cluster: Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert find_api(None) is None
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("TRAINCTL_API", "0")
    assert find_api(None) is None
    monkeypatch.delenv("TRAINCTL_API")
    _register_cluster(home, state, address="127.0.0.1:7000")  # a new head on the old state dir
    assert find_api(None) is None


def test_the_http_client_gives_what_the_ray_client_gives(served, monkeypatch):
    from orchestrator.client.http import ApiUnavailable, ReadClient
    from orchestrator.errors import JobNotFound, UserError

    api, _, state = served
    _register_cluster(Path(os.environ["TRAINCTL_HOME"]), state)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    client = ReadClient(None)
    assert client.via == "http"
    assert client.get(JOB["id"]) == JOB
    assert client.list(["SUCCEEDED"], None, 5) == [SUMMARY]
    assert client.read_logs(JOB["id"], 0) == (LOG, len(LOG))
    assert client.read_logs(JOB["id"], len(LOG)) == ("", len(LOG))
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        client.get("nope")
    assert client.cancel(RUNNING["id"]) == {**RUNNING, "state": "CANCELLED"}
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        client.cancel("nope")
    with pytest.raises(UserError, match="already ended"):
        client.cancel(JOB["id"])
    assert client.via == "http"  # a user error is an answer, not a reason to switch to Ray
    with pytest.raises(ApiUnavailable):  # what a controller of another version lacks: ask Ray
        client.http._request("GET", "jobs/x/newer-endpoint")


class FakeRayClient:
    """Stands in for api.Client (which needs a Ray cluster: the cluster tests use the real one)."""

    def list(self, states=None, ended_since=None, limit=None):
        return ["via ray"]

    def cancel(self, job_id):
        return {"id": job_id, "state": "CANCELLED", "via": "ray"}


def test_a_stale_api_file_falls_back_to_ray_quietly(tmp_path, monkeypatch):
    from orchestrator.client.http import ReadClient

    with socket.socket() as s:  # a port where nothing listens any more
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    (state / API_FILE).write_text(json.dumps({"url": f"http://127.0.0.1:{dead}", "token": "t", "cluster": CLUSTER}))
    _register_cluster(Path(os.environ["TRAINCTL_HOME"]), state)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    client = ReadClient(None)
    assert client.via == "http"
    client.ray = FakeRayClient()
    assert client.list() == ["via ray"]
    assert client.via == "ray"
    cancelling = ReadClient(None)
    cancelling.ray = FakeRayClient()
    assert cancelling.via == "http" and cancelling.cancel("x")["via"] == "ray"


def test_a_post_is_not_sent_twice_on_a_new_connection():
    """A cancel whose connection drops unanswered may have been done: the Ray path decides,
    rather than a second POST. A GET (a read) is asked once more."""
    from orchestrator.client.http import ApiUnavailable, HttpClient

    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(10)

        def hang_up():  # read the request, answer nothing, close
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                accepted.append(conn.recv(65536).split(b" ")[0])
                conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ApiUnavailable):
            HttpClient(url, "t").cancel("j")
        assert accepted == [b"POST"]
        with pytest.raises(ApiUnavailable):
            HttpClient(url, "t").get("j")
        assert accepted == [b"POST", b"GET", b"GET"]


def test_a_wrong_token_in_the_file_falls_back_to_ray(served, tmp_path, monkeypatch):
    from orchestrator.client.http import ReadClient

    api, _, _ = served
    state = tmp_path / "state"
    state.mkdir()
    (state / API_FILE).write_text(json.dumps({"url": api.url, "token": "old-token", "cluster": CLUSTER}))
    _register_cluster(Path(os.environ["TRAINCTL_HOME"]), state)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    client = ReadClient(None)
    client.ray = FakeRayClient()
    assert client.list() == ["via ray"] and client.via == "ray"


# ---- the CLI: fast path, no heavy imports ---------------------------------------------------------

HEAVY = ("ray", "torch", "pyarrow", "pydantic", "sqlalchemy", "numpy")
_PROBE = """
import json, runpy, sys
sys.argv = ["trainctl", *json.loads(sys.argv[1])]
try:
    runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("PROBE " + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def _probe(args: list[str], env: dict) -> tuple[str, dict]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO, timeout=60)
    line = next(x for x in done.stderr.splitlines() if x.startswith("PROBE "))
    return done.stdout, json.loads(line[len("PROBE "):])


@pytest.mark.parametrize("args, expect", [
    (["--help"], "Commands:"),
    (["list", "--json"], '"id": "toy-abc123"'),
    (["list", "--all"], "toy-abc123"),
    (["status", "toy-abc123"], "history"),
    (["status", "toy-abc123", "--json"], '"loss": 0.25'),
    (["logs", "toy-abc123", "--rank", "1"], "[rank 1] world"),
    (["top", "--once"], "toy-abc123"),
    (["cancel", "long-def456"], "long-def456 CANCELLED"),
])
def test_read_verbs_over_http_import_no_ray_torch_or_pyarrow(served, args, expect):
    """In a fresh interpreter, as a user runs it: the fast path must stay clear of heavy modules."""
    _, _, state = served
    home = Path(os.environ["TRAINCTL_HOME"])
    _register_cluster(home, state)
    out, probe = _probe(args, {"TRAINCTL_HOME": str(home), "RAY_ADDRESS": ""})
    assert probe["code"] in (0, None), (probe, out)
    assert expect in out
    assert probe["heavy"] == [], f"trainctl {' '.join(args)} imported {probe['heavy']}"


def test_an_unknown_job_over_http_is_the_same_one_line(served):
    _, _, state = served
    home = Path(os.environ["TRAINCTL_HOME"])
    _register_cluster(home, state)
    for verb in ("status", "cancel"):
        done = trainctl(verb, "no-such-job", env={"TRAINCTL_HOME": str(home), "RAY_ADDRESS": ""})
        assert (done.returncode, done.stderr) == (2, "trainctl: error: no job 'no-such-job'; 'trainctl list' shows the jobs\n")


def test_lazy_groups_list_the_help_they_have_when_loaded():
    """--help lists `data`, `sweep`, ... without importing them: the lines must stay the same."""
    import importlib

    from click.testing import CliRunner

    from orchestrator.client.cli import _Group, main

    lazy_help = CliRunner().invoke(main, ["--help"], prog_name="trainctl").stdout
    loaded = [name for name in _Group.LAZY if name not in main.commands]
    try:
        for name in loaded:
            module, attr, _ = _Group.LAZY[name]
            main.add_command(getattr(importlib.import_module(module), attr), name)
        assert CliRunner().invoke(main, ["--help"], prog_name="trainctl").stdout == lazy_help
    finally:
        for name in loaded:
            main.commands.pop(name, None)


# ---- the real thing: a head started by `trainctl cluster up` ------------------------------------

JOB_YAML = """\
name: http-job
entrypoint: tests.jobs.train_fns:gated
working_dir: {repo}
config: {{epochs: 2, steps: 3}}
resources: {{workers: 2, cpus_per_worker: 1, placement: pack}}
checkpoint: {{storage: {runs}}}
"""


class Head:
    def __init__(self, root: Path):
        self.home, self.state = root / "home", root / "state"
        self.env = {"TRAINCTL_HOME": str(self.home), "TRAINCTL_STATE": str(self.state), "RAY_ADDRESS": ""}
        self.job_id: str | None = None

    def run(self, *args: str, via: str = "http"):
        return trainctl(*args, env={**self.env, "TRAINCTL_API": "1" if via == "http" else "0"})

    @property
    def api_file(self) -> Path:
        return self.state / API_FILE


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One `trainctl cluster up` head for the module, with one finished 2-rank job on it."""
    root = tmp_path_factory.mktemp("head")
    head = Head(root)
    up = head.run("cluster", "up", "--num-cpus", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        job_file = root / "job.yaml"
        job_file.write_text(JOB_YAML.format(repo=REPO, runs=root / "runs"))
        submitted = head.run("submit", str(job_file))
        assert submitted.returncode == 0, submitted.stderr
        head.job_id = submitted.stdout.strip()

        def ended():
            got = head.run("status", head.job_id, "--json")
            return got.returncode == 0 and json.loads(got.stdout)["state"] in ("SUCCEEDED", "FAILED") \
                and json.loads(got.stdout)
        job = wait_for(ended, 180, interval=0.5, what="the job to end")
        assert job["state"] == "SUCCEEDED", job["error"]
        yield head
    finally:
        head.run("cluster", "down")


def _steady(text: str) -> str:
    """What two calls a moment apart print alike: no AGE column, no clock in top's title."""
    text = re.sub(r"trainctl top\s+\d\d:\d\d:\d\d", "trainctl top", text)
    return re.sub(r"\s+\d+:\d\d(:\d\d)?\s*$", "", text, flags=re.M)


@pytest.mark.timeout(400)
def test_the_controllers_api_file_is_owner_only_on_loopback_and_wants_the_token(head):
    info = json.loads(head.api_file.read_text())
    assert stat.S_IMODE(head.api_file.stat().st_mode) == 0o600
    cluster = json.loads((head.home / "cluster.json").read_text())
    assert info["cluster"] == cluster["address"]  # the client can tell which head wrote it
    assert info["url"].startswith("http://127.0.0.1:")
    assert _get(info["url"] + "/api/v1/jobs")[0] == 401
    assert _get(info["url"] + "/api/v1/jobs", "not-the-token")[0] == 401
    status, ping = _get(info["url"] + "/api/v1/ping", info["token"])
    assert status == 200 and ping["api"] == info["url"]
    status, job = _get(f"{info['url']}/api/v1/jobs/{head.job_id}", info["token"])
    assert status == 200 and job["state"] == "SUCCEEDED"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("args, needle", [
    (["list", "--json"], "{job}"), (["list", "--all"], "{job}"), (["status", "{job}", "--json"], "{job}"),
    (["status", "{job}"], "{job}"), (["logs", "{job}"], "[rank 0] finished epoch 1"),
    (["logs", "{job}", "--rank", "1"], "[rank 1] finished epoch 1"),
    (["logs", "{job}", "--follow"], "[trainctl] SUCCEEDED"), (["top", "--once", "--all"], "{job}"),
])
def test_read_verbs_print_the_same_over_http_as_over_ray(head, args, needle):
    args = [a.format(job=head.job_id) for a in args]
    over_http, probe = _probe(args, {**head.env, "TRAINCTL_API": "1"})
    assert probe["code"] in (0, None) and probe["heavy"] == [], probe  # really the HTTP path
    over_ray = head.run(*args, via="ray")
    assert over_ray.returncode == 0, over_ray.stderr
    assert needle.format(job=head.job_id) in over_http
    assert _steady(over_http) == _steady(over_ray.stdout)


@pytest.mark.timeout(400)
def test_a_stale_or_foreign_api_file_falls_back_to_ray(head):
    good = head.api_file.read_text()
    expected = head.run("status", head.job_id, "--json").stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    info = json.loads(good)
    try:
        for stale in ({**info, "url": f"http://127.0.0.1:{dead}"}, {**info, "token": "an-old-token"}):
            head.api_file.write_text(json.dumps(stale))
            got = head.run("status", head.job_id, "--json")
            assert (got.returncode, got.stderr) == (0, ""), got.stderr
            assert got.stdout == expected
    finally:
        head.api_file.write_text(good)


LONG_YAML = """\
name: http-cancel
entrypoint: tests.jobs.train_fns:gated
working_dir: {repo}
config: {{epochs: 3, steps: 3, hold_after: 0, gate: {gate}}}
resources: {{workers: 1, cpus_per_worker: 1}}
checkpoint: {{storage: {runs}}}
"""


@pytest.mark.timeout(400)
def test_cancel_over_http_stops_a_running_job_as_cancel_over_ray_would(head, tmp_path):
    job_file = tmp_path / "long.yaml"
    job_file.write_text(LONG_YAML.format(repo=REPO, gate=tmp_path / "never", runs=tmp_path / "runs"))
    submitted = head.run("submit", str(job_file))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    wait_for(lambda: json.loads(head.run("status", job_id, "--json").stdout)["state"] == "RUNNING", 120,
             interval=0.5, what="the job to run")  # it holds after its first epoch, for ever
    out, probe = _probe(["cancel", job_id], {**head.env, "TRAINCTL_API": "1"})
    assert (probe["code"] in (0, None), probe["heavy"]) == (True, []), probe  # really the HTTP path
    assert out == f"{job_id} CANCELLED\n"
    job = json.loads(head.run("status", job_id, "--json", via="ray").stdout)
    assert job["state"] == "CANCELLED"
    for args in (["cancel", job_id], ["cancel", "nope"]):  # an ended job, an unknown one: one line, exit 2
        over_http, over_ray = head.run(*args), head.run(*args, via="ray")
        assert over_http.returncode == over_ray.returncode == 2, (over_http.stderr, over_ray.stderr)
        assert over_http.stderr == over_ray.stderr and over_http.stderr.count("\n") == 1, over_http.stderr
    assert "already ended (CANCELLED)" in head.run("cancel", job_id).stderr
