"""The deployment manifests in cluster/deploy/ carry what trainctl relies on."""

from __future__ import annotations

import shlex

import ray
import yaml

from orchestrator.control.store import StateLocation
from orchestrator.monitoring.metrics import DEFAULT_PORT

from ..helpers import REPO

DEPLOY = REPO / "cluster" / "deploy"


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _kuberay() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text())}


def test_kuberay_head_keeps_its_store_on_a_persistent_volume_and_serves_metrics():
    docs = _kuberay()
    cluster = docs["RayCluster"]["spec"]
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    head = cluster["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    env = _env(container)
    state = env["TRAINCTL_STATE"]["value"]
    location = StateLocation.parse(state)  # a value trainctl accepts
    if not location.is_postgres:  # a directory must be on a volume that outlives the pod
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in head["volumes"] if v["name"] == mounts[state])
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    port = int(env["TRAINCTL_METRICS_PORT"]["value"])
    assert port == DEFAULT_PORT and env["TRAINCTL_METRICS_HOST"]["value"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["trainctl-metrics"] == port
    service = docs["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == "trainctl-metrics"
    assert service["selector"]["ray.io/node-type"] == "head"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no ranks on the head


def test_kuberay_every_node_uses_the_same_ray_token_and_checkpoint_path():
    cluster = _kuberay()["RayCluster"]["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    secrets, checkpoint_mounts = set(), set()
    for pod in pods:
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        checkpoint_mounts.add(mounts["checkpoints"])
    assert len(secrets) == 1 and len(checkpoint_mounts) == 1


def test_ray_cluster_launcher_starts_every_node_with_token_auth_and_the_head_with_a_store():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    words = dict(w.split("=", 1) for w in shlex.split(head) if "=" in w and w.split("=", 1)[0].isupper())
    StateLocation.parse(words["TRAINCTL_STATE"])
    assert words["TRAINCTL_METRICS_PORT"] == str(DEFAULT_PORT)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_prometheus_scrape_config_keeps_the_training_jobs_label():
    prometheus = yaml.safe_load((REPO / "cluster" / "monitoring" / "prometheus.yml").read_text())
    trainctl = next(s for s in prometheus["scrape_configs"] if s["job_name"] == "trainctl")
    assert trainctl["honor_labels"] is True
    assert trainctl["static_configs"][0]["targets"][0].endswith(f":{DEFAULT_PORT}")
