"""Metrics end to end: a 2-worker job on the simulated cluster, scraped by a real Prometheus.

Every PromQL expression of the generated dashboards is evaluated through Prometheus' HTTP
API against the running job and must parse and return data; `trainctl status` and the
metrics agree on step count and throughput; the job's series go after the grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from orchestrator.monitoring import dashboards

from ..datasets import write_dataset
from ..helpers import job_spec, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

GRACE_S = 15
RATE_WINDOW = "10s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str | None:
    """The `prometheus` binary; installed with apt-get (Debian's package) where it is missing and we can."""
    found = shutil.which("prometheus")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], capture_output=True, timeout=600,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("prometheus")


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: trainctl\n"
            "    honor_labels: true\n"  # as cluster/monitoring/prometheus.yml: keep the series' job label
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or _get(f"{self.url}/-/ready")[0] == 200, 60,
                 what="Prometheus ready")
        assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]

    def query(self, expr: str) -> dict:
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return {"http": status, **json.loads(body)} if body.startswith("{") else {"http": status, "error": body}

    def value(self, expr: str) -> float | None:
        result = self.query(expr).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def client(ray_cluster):
    from orchestrator.client.api import Client

    with pytest.MonkeyPatch.context() as mp:  # read when the client creates the controller
        mp.setenv("TRAINCTL_METRICS_PORT", "0")  # tests share the machine: any free port
        mp.delenv("TRAINCTL_METRICS_HOST", raising=False)
        mp.setenv("TRAINCTL_METRICS_GRACE_S", str(GRACE_S))
        return Client(ray_cluster.address)


@pytest.fixture(scope="module")
def prometheus(client, tmp_path_factory):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("needs the `prometheus` binary (apt-get install prometheus, or put it on PATH)")
    target = urllib.parse.urlparse(client.info["metrics"]).netloc
    prom = Prometheus(binary, target, tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.stop()


def _substitute(expr: str, job_id: str) -> str:
    out = expr.replace("$__rate_interval", RATE_WINDOW).replace("$job", job_id)
    assert "$" not in out, out
    return out


def _ranks_have_gpus(spec: dict) -> bool:
    """Whether GPU series can exist: the job's ranks asked for GPUs and the cluster has them
    (not whether this test process sees CUDA: the simulated nodes may have none)."""
    import ray

    asked = spec["resources"].get("gpus_per_worker", 0) > 0
    return asked and ray.cluster_resources().get("GPU", 0) > 0


def test_endpoint_is_on_loopback(client, ray_cluster):
    endpoint = client.info["metrics"]
    assert endpoint.startswith("http://127.0.0.1:") and endpoint.endswith("/metrics")
    status, body = _get(endpoint)
    assert status == 200 and "trainctl_build_info" in body and "trainctl_cluster_nodes 2.0" in body
    out = trainctl("cluster", "status", "--address", ray_cluster.address)
    assert out.returncode == 0, out.stderr
    assert f"metrics at {endpoint}" in out.stdout


def test_dashboards_against_a_real_prometheus(client, prometheus, ray_cluster, tmp_path):
    data = write_dataset(tmp_path / "data", [64] * 4)
    gate = tmp_path / "gate"
    spec = job_spec("metrics", "tests.jobs.metrics_fns:steady", tmp_path,
                    config={"gate": str(gate), "step_s": 0.02},
                    data={"train": {"path": str(data), "batch_size": 8, "shuffle": True}},
                    checkpoint={"storage": str(tmp_path / "runs"), "keep": 2, "every_n_steps": 25})
    job_id = client.submit(spec)
    sel = f'{{job="{job_id}"}}'
    try:
        # running, checkpointed, and scraped long enough for 10 s rates
        wait_for(lambda: (j := client.get(job_id))["state"] == "RUNNING" and j.get("checkpoint"), 120,
                 what="job running with a checkpoint")
        try:
            # every rank's counters were in every scrape of the last 15 s (RATE_WINDOW: 10 s)
            wait_for(lambda: (prometheus.value(
                f"min(count_over_time(trainctl_samples_processed_total{sel}[15s]))") or 0) >= 12,
                     90, what="Prometheus has scraped the job's ranks for 15 s")
        except AssertionError as exc:
            targets = _get(f"{prometheus.url}/api/v1/targets")[1]
            raise AssertionError(f"{exc}\ntargets: {targets[:2000]}\nendpoint: {_get(client.info['metrics'])[1][-3000:]}") from None

        # every panel's expression parses and returns data
        problems = []
        checked = 0
        for board, panel in dashboards.all_panels():
            if panel.gpu and not _ranks_have_gpus(spec):
                continue  # GPU series are absent where the ranks have no GPUs
            for expr, _legend in panel.targets:
                query = _substitute(expr, job_id)
                result = prometheus.query(query)
                checked += 1
                if result.get("status") != "success":
                    problems.append(f"{board}/{panel.title}: {query!r} failed: {result.get('error')}")
                elif not result["data"]["result"]:
                    problems.append(f"{board}/{panel.title}: {query!r} returned no data")
        if problems:
            body = _get(client.info["metrics"])[1]
            lines = [ln for ln in body.splitlines() if job_id in ln and ("samples" in ln or "checkpoint_size" in ln or "loss" in ln)]
            names = prometheus.query(f'count by (__name__) ({{job="{job_id}"}})')
            raw = prometheus.query(f"trainctl_samples_processed_total{sel}[30s]")
            problems += ["endpoint:", *lines, f"prom names: {names}", f"raw: {raw}", f"job: {client.get(job_id)['state']}",
                         f"scrapes: {prometheus.query('scrape_samples_scraped[20s]')}"]
        assert problems == [], "\n".join(problems)
        assert checked >= 40

        # throughput: status (supervisor's 10 s window) vs the counters' rate in Prometheus
        job = client.get(job_id)
        status_rate = job["progress"]["samples_per_s"]
        prom_rate = prometheus.value(f"sum(rate(trainctl_samples_processed_total{sel}[{RATE_WINDOW}]))")
        assert status_rate > 0 and prom_rate is not None
        raw = prometheus.query(f"trainctl_samples_processed_total{sel}[30s]")
        assert abs(prom_rate - status_rate) / status_rate < 0.35, (prom_rate, status_rate, raw)
        # the health signals come from the same progress record, refreshed on the controller's loop
        assert job["health"]["samples_per_s"] == pytest.approx(status_rate, rel=0.05)
        assert job["health"]["goodput_ratio"] is not None and 0 < job["health"]["goodput_ratio"] <= 1
        assert job["health"]["data_stall_ratio"] is not None

        # the terminal shows the same signals
        human = trainctl("status", job_id, "--address", ray_cluster.address)
        assert human.returncode == 0, human.stderr
        assert "health" in human.stdout and "samples/s" in human.stdout and "goodput" in human.stdout
        assert "data stall" in human.stdout and "restarts 0" in human.stdout
        top = trainctl("top", "--once", "--address", ray_cluster.address)
        assert top.returncode == 0, top.stderr
        assert job_id in top.stdout and "GOODPUT" in top.stdout
    finally:
        gate.touch()

    job = client.wait(job_id, timeout_s=120)
    assert job["state"] == "SUCCEEDED", job.get("error")
    # step count and samples: the same in `trainctl status` and in the metrics (before the grace ends)
    status = json.loads(trainctl("status", job_id, "--json", "--address", ray_cluster.address).stdout)
    step = status["progress"]["step"]
    assert step > 0
    wait_for(lambda: prometheus.value(f"max(trainctl_job_step{sel})") == step, GRACE_S,
             what=f"Prometheus' step == status' {step}")
    assert prometheus.value(f"max(trainctl_rank_step{sel})") == step
    samples = prometheus.value(f"sum(trainctl_samples_processed_total{sel})")
    assert samples == status["progress"]["samples_total"]

    # after the grace period the job's series are gone from the endpoint; cluster series stay
    endpoint = client.info["metrics"]
    body = wait_for(lambda: (b := _get(endpoint)[1]) and f'job="{job_id}"' not in b and b,
                    GRACE_S + 60, what="the ended job's series removed")
    assert 'trainctl_jobs_finished_total{outcome="SUCCEEDED"} 1.0' in body
    assert client.get(job_id)["health"]["goodput_ratio"] is not None  # kept with the job record
