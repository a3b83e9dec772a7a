"""The metrics registry, the exporter, the telemetry path and the generated dashboards (no Ray)."""

from __future__ import annotations

import fnmatch
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.control.record import HistoryEntry, RunSnapshot
from orchestrator.control.states import JobState
from orchestrator.monitoring import dashboards
from orchestrator.monitoring import metrics as M
from orchestrator.monitoring.exporter import MetricsExporter, start_exporter
from orchestrator.monitoring.telemetry import JobTelemetry, RankMeter, health
from tests.helpers import job_record

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
EXPR_METRIC = re.compile(r"\btrainctl_[a-z0-9_]+")


# ---- the registry -------------------------------------------------------------------------
def test_every_metric_follows_the_naming_conventions():
    problems = [p for m in M.REGISTRY.values() for p in M.convention_problems(m)]
    assert problems == []
    assert len(M.REGISTRY) >= 30
    assert all("step" not in m.labels for m in M.REGISTRY.values())


@pytest.mark.parametrize("bad, why", [
    (M.MetricDef("trainctl_steps", "counter", ""), "_total"),
    (M.MetricDef("trainctl_step_ms", "histogram", "", buckets=(1.0,)), "base unit"),
    (M.MetricDef("trainctl_loss", "gauge", "", labels=("job", "step")), "step label"),
    (M.MetricDef("steps_total", "counter", ""), "prefix"),
    (M.MetricDef("trainctl_x", "gauge", "", labels=("user",)), "label 'user'"),
])
def test_the_lint_catches_convention_breaks(bad, why):
    assert any(why in p for p in M.convention_problems(bad))


def test_the_minimum_set_is_defined():
    names = set(M.REGISTRY)
    for needed in ("step_duration_seconds", "samples_processed_total", "tokens_processed_total", "loss",
                   "learning_rate", "data_wait_seconds", "data_stall_ratio", "collective_duration_seconds",
                   "checkpoint_save_duration_seconds", "checkpoint_size_bytes",
                   "checkpoint_last_success_timestamp_seconds", "job_state", "jobs_finished_total",
                   "job_restarts_total", "workers", "queue_length", "queue_wait_seconds",
                   "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes", "gpu_utilization_ratio",
                   "job_goodput_ratio", "build"):
        assert M.PREFIX + needed in names


# ---- dashboards -----------------------------------------------------------------------------
def test_committed_dashboards_equal_the_generator_output():
    for name, text in dashboards.generated_files().items():
        path = dashboards.MONITORING_DIR / name
        assert path.exists(), f"{name} missing: run python -m orchestrator.monitoring.dashboards"
        assert path.read_text() == text, f"{name} is stale: run python -m orchestrator.monitoring.dashboards"
    assert dashboards.main(["--check"]) == 0


def _dashboard_expressions():
    for name in ("dashboard-cluster.json", "dashboard-job.json"):
        board = json.loads((dashboards.MONITORING_DIR / name).read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield name, panel["title"], target["expr"]
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                yield name, f"variable {var['name']}", var["definition"]


def test_every_dashboard_expression_references_only_registered_metrics():
    known = M.series_names()
    seen = set()
    for board, title, expr in _dashboard_expressions():
        names = EXPR_METRIC.findall(expr)
        assert names, f"{board} / {title}: no trainctl metric in {expr!r}"
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{board} / {title}: unregistered {unknown} in {expr!r}"
        seen.update(names)
    families = {n for m in M.REGISTRY.values() for n in m.series_names if n in seen}
    # every metric is on some dashboard
    missing = [m.name for m in M.REGISTRY.values() if not set(m.series_names) & families]
    assert missing == []


def test_monitoring_assets_ship_with_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["cluster"]
    files = [p.relative_to(REPO / "cluster").as_posix() for p in (REPO / "cluster" / "monitoring").rglob("*")
             if p.is_file()]
    assert {"monitoring/docker-compose.yml", "monitoring/prometheus.yml",
            "monitoring/dashboard-job.json", "monitoring/dashboard-cluster.json"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)


def test_compose_starts_prometheus_and_grafana_with_the_provisioning():
    import yaml

    compose = yaml.safe_load((dashboards.MONITORING_DIR / "docker-compose.yml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
    mounts = " ".join(compose["services"]["grafana"]["volumes"])
    for name in ("grafana-datasource.yml", "grafana-dashboards.yml", "dashboard-job.json", "dashboard-cluster.json"):
        assert f"./{name}:" in mounts
    assert "./prometheus.yml:" in " ".join(compose["services"]["prometheus"]["volumes"])
    scrape = yaml.safe_load((dashboards.MONITORING_DIR / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{M.DEFAULT_PORT}"]
    assert scrape["scrape_configs"][0]["honor_labels"] is True  # our `job` label is the training job


# ---- telemetry: rank -> supervisor -> health --------------------------------------------------
def test_rank_meter_sums_steps_waits_and_collectives_and_drains_once():
    meter = RankMeter()
    meter.mark()
    for step in range(1, 5):
        meter.on_report({"step": step, "samples": 8, "tokens": 32, "loss": 1.0 / step, "lr": 0.1}, 1, 0.001)
        meter.mark()
    meter.on_report({"step": 4, "accuracy": 0.9}, 0, None)  # an evaluation report: not a step
    meter.collective("all_reduce", 0.002)
    payload = meter.drain()
    assert payload["step_h"]["n"] == 4 and payload["wait_h"]["n"] == 4
    assert payload["samples"] == 32 and payload["tokens"] == 128
    assert payload["loss"] == 0.25 and payload["lr"] == 0.1 and payload["step"] == 4
    assert payload["coll"]["all_reduce"]["n"] == 1
    assert "gpu" not in payload  # this machine's ranks have no GPU: the series are absent
    assert meter.drain() is None


def test_job_telemetry_accumulates_and_goodput_excludes_redone_steps():
    now = time.time()
    tel = JobTelemetry()
    for rank in (0, 1):
        meter = RankMeter()
        meter.mark()
        meter.on_report({"step": 10, "samples": 80}, 10, 0.0)
        payload = meter.drain()
        payload["step_h"]["s"] = 10.0  # ten 1-second steps
        tel.merge(rank, now, payload)
    tel.on_checkpoint(now, {"seconds": 0.5, "bytes": 1234})
    tel.on_restart(reached_step=10, resumed_step=6)  # 4 steps (4 s) are done again
    snap = tel.snapshot()
    assert snap["productive_s"] == pytest.approx(6.0)
    assert snap["ranks"][1]["samples"] == 80 and snap["checkpoint"]["bytes"] == 1234
    job = job_record(history=[{"state": "STARTING", "at": now - 12}], ended_at=now,
                     restarts=[{"at": 0, "attempt": 0, "cause": "x", "kind": "error"}],
                     progress={"samples_per_s": 3.0})
    h = health(job, snap, now)
    assert h["goodput_ratio"] == pytest.approx(0.5) and h["restarts"] == 1 and h["samples_per_s"] == 3.0


# ---- the exporter -----------------------------------------------------------------------------
def _job(job_id, state="RUNNING", ended_at=None):
    now = time.time()
    return job_record(job_id, state, submitted_at=now - 5, started_at=now - 4, ended_at=ended_at,
                      history=[{"state": "STARTING", "at": now - 4}],
                      progress={"step": 3, "samples_per_s": 10.0},
                      placement=[{"rank": 0, "node_id": "n0" * 8, "node_ip": "10.0.0.1", "pid": 1},
                                 {"rank": 1, "node_id": "n1" * 8, "node_ip": "10.0.0.2", "pid": 2}])


def _scrape(exporter) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(exporter.registry).decode()
    return {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples} | {
        "__text__": text}


def test_exporter_renders_jobs_ranks_and_drops_an_ended_job_after_the_grace_period():
    clock = [time.time()]
    jobs = {"a": _job("a"), "b": _job("b")}
    exporter = MetricsExporter(lambda: list(jobs.values()), grace_s=30, clock=lambda: clock[0])
    tel = JobTelemetry()
    meter = RankMeter()
    meter.mark()
    meter.on_report({"step": 3, "samples": 24, "loss": 0.5}, 3, 0.0)
    payload = meter.drain()
    tel.merge(0, time.time(), payload)
    tel.merge(1, time.time(), payload)
    for job in jobs.values():
        exporter.observe(job, RunSnapshot(state=job.state, telemetry=tel.snapshot()))
    text = _scrape(exporter)["__text__"]
    assert 'trainctl_samples_processed_total{job="a",node="n0n0n0n0n0n0",rank="0",strategy="ddp"} 24.0' in text
    assert 'trainctl_job_state{job="b",state="RUNNING",strategy="ddp"} 1.0' in text
    assert 'step=' not in text
    jobs["a"].state, jobs["a"].ended_at = JobState.SUCCEEDED, clock[0]
    clock[0] += 10  # within the grace period: still there
    assert 'job="a"' in _scrape(exporter)["__text__"]
    clock[0] += 25  # past it: gone, and its telemetry forgotten
    text = _scrape(exporter)["__text__"]
    assert 'job="a"' not in text and 'job="b"' in text
    assert 'trainctl_jobs_finished_total{outcome="SUCCEEDED"} 1.0' in text
    exporter.prune()
    assert set(exporter.telemetry) == {"b"}
    # failed while queued: no ended_at, its history says when
    jobs["q"] = _job("q", state="FAILED")
    jobs["q"].history.append(HistoryEntry(state=JobState.FAILED, at=clock[0]))
    assert 'job="q"' in _scrape(exporter)["__text__"]
    clock[0] += 31
    assert 'job="q"' not in _scrape(exporter)["__text__"]


def test_endpoint_binds_to_loopback_unless_configured(monkeypatch):
    monkeypatch.setenv("TRAINCTL_METRICS_PORT", "0")
    monkeypatch.delenv("TRAINCTL_METRICS_HOST", raising=False)
    exporter = start_exporter(lambda: [])
    try:
        assert exporter.server.server_address[0] == "127.0.0.1"
        assert exporter.endpoint.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(exporter.endpoint, timeout=10).read().decode()
        assert "trainctl_build_info" in body
    finally:
        exporter.close()
    monkeypatch.setenv("TRAINCTL_METRICS_HOST", "0.0.0.0")
    exporter = start_exporter(lambda: [])
    try:
        assert exporter.server.server_address[0] == "0.0.0.0"
    finally:
        exporter.close()


def test_a_port_in_use_falls_back_to_a_free_one():
    first = start_exporter(lambda: [], {"port": 0, "host": "127.0.0.1", "enabled": True})
    port = first.server.server_address[1]
    try:
        second = start_exporter(lambda: [], {"port": port, "host": "127.0.0.1", "enabled": True})
        try:
            assert second.server.server_address[1] != port
        finally:
            second.close()
    finally:
        first.close()


def test_metrics_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TRAINCTL_METRICS", "0")
    assert not M.enabled()
    exporter = start_exporter(lambda: [])
    assert exporter.server is None and exporter.endpoint is None


# ---- the terminal ------------------------------------------------------------------------------
def test_status_and_top_show_the_health_signals():
    from rich.console import Console

    from orchestrator.client.render import health_line, print_status, top_table
    record = _job("j-1")
    record.metrics, record.placement = {"loss": 0.5}, []
    record.spec = record.spec.model_copy(update={"resources": record.spec.resources.model_copy(
        update={"placement": "spread"})})
    record.health = {"samples_per_s": 123.4, "steps_per_s": 7.7, "data_stall_ratio": 0.125,
                     "restarts": 1, "goodput_ratio": 0.8, "step_s": 0.05, "rank_skew": 1.1,
                     "wall_s": 10, "productive_s": 8}
    job = record.to_json()  # what the client renders
    line = health_line(job)
    assert "123.4 samples/s" in line and "data stall 12.5%" in line and "restarts 1" in line
    assert "goodput 80.0%" in line
    console = Console(record=True, width=200)
    print_status(console, job)
    console.print(top_table([record.summary()]))  # `top` lists summaries, as `list` does
    text = console.export_text()
    assert "health" in text and "goodput 80.0%" in text and "12.5%" in text and "j-1" in text


# ---- on a GPU: the step never waits for the device -----------------------------------------
class _Reporter:
    """Collects what a rank would ship (the real Reporter pickles the events on its thread)."""

    def __init__(self):
        self.events, self.sources = [], []

    def emit(self, kind, payload):
        self.events.append((kind, payload))


class _Strategy:
    """A strategy whose all_reduce returns at once, as nccl's does once it enqueued the work."""

    name = "fake"

    def __init__(self, device):
        self.device = device

    def all_reduce(self, tensor, op="sum"):
        return tensor


class _Event:
    """Stands in for torch.cuda.Event (no GPU here): completes when the test says the GPU got there."""

    def __init__(self, ms=0.0):
        self.ms, self.complete, self.recorded = ms, False, 0

    def record(self, stream=None):
        self.recorded += 1

    def query(self):
        return self.complete

    def elapsed_time(self, end):
        return end.ms - self.ms


def _context(device, reporter):
    from orchestrator.runtime.context import TrainContext
    from strategies import WorkerEnv

    return TrainContext(WorkerEnv(rank=0, world_size=1), _Strategy(device), job_id="j", config={},
                        reporter=reporter, checkpoints=None, resume_from=None)


def test_reported_tensors_are_read_on_the_reporters_thread_not_on_the_step():
    import pickle

    import torch

    from orchestrator.monitoring.telemetry import DeviceValue

    reporter = _Reporter()
    ctx = _context(torch.device("cpu"), reporter)
    loss = torch.tensor(0.5, requires_grad=True) * 1  # what a training loop has in hand
    ctx.report({"loss": loss, "samples": torch.tensor(8), "tokens": 32, "acc": torch.tensor([0.25])})
    loss.data.fill_(9.0)  # the next step reuses the storage: the report keeps the value it had
    kind, metrics = reporter.events[-1]
    assert kind == "metrics" and ctx.step == 1
    # not read yet (on a GPU .item() here would sync the device every step) ...
    assert isinstance(metrics["loss"], DeviceValue) and isinstance(metrics["samples"], DeviceValue)
    # ... but what reaches the supervisor (pickled on the reporter's thread) is plain numbers
    shipped = pickle.loads(pickle.dumps(metrics))
    assert shipped == {"loss": 0.5, "samples": 8, "tokens": 32, "acc": 0.25, "step": 1}
    assert type(shipped["loss"]) is float and type(shipped["samples"]) is int
    payload = ctx._meter.drain()  # the reporter's source, on its thread
    assert payload["loss"] == 0.5 and payload["samples"] == 8 and payload["tokens"] == 32


def test_a_collective_on_the_gpu_counts_its_device_time_not_the_enqueue(monkeypatch):
    import torch

    from orchestrator.monitoring import telemetry

    start, end = _Event(ms=0.0), _Event(ms=200.0)
    monkeypatch.setattr(telemetry.DeviceTimer, "for_device", classmethod(
        lambda cls, device: cls(start, end) if device.type == "cuda" else None))
    ctx = _context(torch.device("cuda", 0), _Reporter())
    ctx.all_reduce(torch.ones(1))
    assert (start.recorded, end.recorded) == (1, 1)
    assert ctx._meter.drain() is None  # the GPU has not finished it: nothing to count yet
    end.complete = True
    coll = ctx._meter.drain()["coll"]["all_reduce"]
    assert coll["n"] == 1 and coll["s"] == pytest.approx(0.2)  # the events' 200 ms, not ~0 s
    # a collective that blocked the host (gloo) keeps the host's time
    meter = RankMeter()
    quick_end = _Event(ms=1.0)
    quick_end.complete = True
    meter.collective("barrier", 0.3, telemetry.DeviceTimer(_Event(), quick_end))
    assert meter.drain()["coll"]["barrier"]["s"] == pytest.approx(0.3)
    # on the CPU there are no events: the host's clock, counted at once
    cpu = _context(torch.device("cpu"), _Reporter())
    cpu.all_reduce(torch.ones(1))
    assert cpu._meter.drain()["coll"]["all_reduce"]["n"] == 1


class _Cuda:
    """Stands in for torch.cuda on a GPU machine (there is none here)."""

    def __init__(self, utilization=None):
        self._utilization = utilization

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def memory_allocated(self, device):
        return 1024

    def memory_reserved(self, device):
        return 4096

    def utilization(self, device):
        if self._utilization is None:
            raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")
        return self._utilization


def test_gpu_utilisation_comes_from_nvml_and_its_absence_is_said_once(monkeypatch, capsys):
    import torch

    from orchestrator.monitoring import telemetry

    device = torch.device("cuda", 0)
    monkeypatch.setattr(telemetry, "_nvml_installed", lambda: True)
    payload = RankMeter(lambda: device, cuda=_Cuda(utilization=42)).drain()
    assert payload["gpu"] == {"allocated": 1024.0, "reserved": 4096.0, "utilization": 0.42}

    monkeypatch.setattr(telemetry, "_nvml_installed", lambda: False)
    meter = RankMeter(lambda: device, cuda=_Cuda())
    samples = [meter.drain()["gpu"] for _ in range(3)]
    assert samples[-1] == {"allocated": 1024.0, "reserved": 4096.0}  # memory still, no utilisation
    said = [line for line in capsys.readouterr().err.splitlines() if "gpu_utilization_ratio" in line]
    assert len(said) == 1 and "pynvml" in said[0] and "trainctl[gpu]" in said[0]


def test_gpu_metrics_are_rendered_on_metrics_from_the_snapshot():
    meter = RankMeter()
    meter.mark()
    meter.on_report({"step": 1, "samples": 8}, 1, None)
    payload = meter.drain()
    payload["gpu"] = {"allocated": 1024.0, "reserved": 4096.0, "utilization": 0.42}
    tel = JobTelemetry()
    tel.merge(0, time.time(), payload)
    exporter = MetricsExporter(lambda: [_job("g")])
    exporter.observe(_job("g"), RunSnapshot(state="RUNNING", telemetry=tel.snapshot()))
    text = _scrape(exporter)["__text__"]
    labels = '{job="g",node="n0n0n0n0n0n0",rank="0",strategy="ddp"}'
    assert f"trainctl_gpu_utilization_ratio{labels} 0.42" in text
    assert f"trainctl_gpu_memory_allocated_bytes{labels} 1024.0" in text
    assert f"trainctl_gpu_memory_reserved_bytes{labels} 4096.0" in text


@pytest.mark.gpu
def test_gpu_memory_is_reported_where_there_is_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda", 0)
    x = torch.ones(1024, 1024, device=device)
    meter = RankMeter(lambda: device)
    payload = meter.drain()
    assert payload["gpu"]["allocated"] >= x.numel() * 4
    assert payload["gpu"]["reserved"] >= payload["gpu"]["allocated"]


def test_live_view_stops_when_the_watched_job_ends():
    from rich.console import Console

    from orchestrator.client.render import live_view

    states = iter(["RUNNING", "SUCCEEDED"])
    frames = []
    live_view(Console(record=True, width=120), lambda: {"state": next(states)},
              lambda c, job: frames.append(job["state"]) or c.print(job["state"]), interval_s=0.01,
              until_done=True)
    assert frames == ["RUNNING", "SUCCEEDED"]


def test_a_script_job_is_listed_and_labelled_as_a_script():
    job = job_record(spec={"name": "s", "command": ["python", "train.py"]})
    assert job.summary()["strategy"] == "script" and job.strategy_label == "script"
    assert _job("d").summary()["strategy"] == "ddp"
