"""Kubernetes manifests (deploy/kubernetes): valid offline, and consistent with the server they run.

Each manifest is validated strictly (unknown fields fail) against kubernetes-validate's bundled
schemas of fixed Kubernetes versions; the PodMonitor, a CRD those schemas lack, against a schema
of the fields used here. The other tests check what breaks silently in a cluster: a selector
that matches no pod, a probe on a path the app does not serve, a variable the server ignores, an
HPA metric that no adapter rule produces, a grace period shorter than the server's drain.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
# The oldest and the newest Kubernetes the manifests are checked against (the package bundles 1.25+).
KUBERNETES_VERSIONS = ("1.30", "1.37")
CRD_GROUPS = ("monitoring.coreos.com/",)

# The PodMonitor fields used here; additionalProperties false catches a misspelt field.
POD_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                   "additionalProperties": {"type": "string"}}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port", "path"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


# --------------------------------------------------------------------------- helpers


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[dict[str, Any]]:
    """Every resource the kustomization applies, in its order."""
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    found = [doc for doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return resource("Deployment")["spec"]["template"]["spec"]


def pod_labels() -> dict[str, str]:
    return resource("Deployment")["spec"]["template"]["metadata"]["labels"]


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return only


def env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container().get("env", [])}


def env_value(name: str) -> str | None:
    item = env().get(name)
    return None if item is None else item.get("value")


def setting(name: str) -> Any:
    """A server setting as the Deployment sets it, else the server's default."""
    from neuronguard.server.settings import Settings

    value = env_value(f"NEURONGUARD_{name.upper()}")
    return Settings.model_fields[name].default if value is None else getattr(Settings(**{name: value}), name)


def http_port() -> dict[str, Any]:
    (port,) = container()["ports"]
    return port


def probes() -> dict[str, dict[str, Any]]:
    return {kind: container()[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container()}


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def go_replacement(template: str) -> str:
    """A Go regexp replacement (`$1`, `${1}`) as Python's `re.sub` spells it."""
    return re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", template)


def adapter_metric_name(rule: dict[str, Any], series: str) -> str | None:
    """The custom metric name the adapter publishes for `series` (None: the rule does not match it)."""
    naming = rule.get("name", {})
    pattern = naming.get("matches", "^(.*)$")
    if not re.search(pattern, series):
        return None
    return re.sub(pattern, go_replacement(naming.get("as", "$1" if re.compile(pattern).groups == 1 else "$0")), series)


def series_name(rule: dict[str, Any]) -> str:
    m = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", rule["seriesQuery"])
    assert m, f"the seriesQuery names one metric: {rule['seriesQuery']}"
    return m.group(1)


def server_metric_types() -> dict[str, str]:
    from neuronguard.server.metrics import Metrics

    return {family.name: family.type for family in Metrics().registry.collect()}


def server_routes() -> dict[str, Any]:
    """GET path -> endpoint function, from the app the server builds (nothing loads)."""
    from neuronguard.server.app import create_app
    from neuronguard.server.settings import Settings

    return {route.path: route.endpoint for route in create_app(Settings()).routes
            if "GET" in getattr(route, "methods", set())}


def pre_stop_seconds() -> float:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------- schemas


def test_kustomization_applies_every_manifest_in_one_namespace() -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == files
    namespace = resource("Namespace")["metadata"]["name"]
    assert kustomization()["namespace"] == namespace
    assert all("namespace" not in doc["metadata"] for doc in manifests()), "kustomize sets the namespace"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    checked = set()
    for doc in manifests():
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= checked


def test_pod_monitor_matches_its_crd_fields() -> None:
    crds = [doc for doc in manifests() if doc["apiVersion"].startswith(CRD_GROUPS)]
    assert [doc["kind"] for doc in crds] == ["PodMonitor"], "every CRD resource needs a schema here"
    jsonschema.validate(crds[0], POD_MONITOR_SCHEMA)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_the_same_resources_in_the_namespace() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, manifests()))
    namespace = kustomization()["namespace"]
    assert all(doc["metadata"].get("namespace") == namespace for doc in docs if doc["kind"] != "Namespace")


# --------------------------------------------------------------------------- cross-references


def test_selectors_match_the_pod_labels() -> None:
    labels = pod_labels()
    deployment_selector = resource("Deployment")["spec"]["selector"]["matchLabels"]
    selectors = {
        "Deployment": deployment_selector,
        "Service": resource("Service")["spec"]["selector"],
        "PodMonitor": resource("PodMonitor")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), f"{kind} selects {selector}, the pods have {labels}"
    assert selectors["Service"] == deployment_selector
    target = resource("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", resource("Deployment")["metadata"]["name"])


def test_ports_are_the_one_the_server_listens_on() -> None:
    port = http_port()
    assert port["containerPort"] == setting("port")
    name = port["name"]
    assert resource("Service")["spec"]["ports"][0]["targetPort"] == name
    assert [e["port"] for e in resource("PodMonitor")["spec"]["podMetricsEndpoints"]] == [name]
    for kind, probe in probes().items():
        assert probe["httpGet"]["port"] == name, kind


def test_probes_and_scrapes_hit_routes_the_app_serves_without_a_key() -> None:
    from neuronguard.server import routes
    from neuronguard.server.auth import OPEN_PATHS

    served = server_routes()
    paths = {kind: probe["httpGet"]["path"] for kind, probe in probes().items()}
    assert served.get(paths["readinessProbe"]) is routes.ready
    assert served.get(paths["livenessProbe"]) is routes.health
    assert served.get(paths["startupProbe"]) is routes.health  # answers once the port listens, before loading
    scraped = [e["path"] for e in resource("PodMonitor")["spec"]["podMetricsEndpoints"]]
    assert all(served.get(path) is routes.metrics for path in scraped)
    assert set(paths.values()) | set(scraped) <= OPEN_PATHS, "probes and scrapes carry no API key"


# Variables outside the server's settings, each with the module that reads it.
OTHER_VARIABLES = {
    "HF_HOME": "huggingface_hub.constants",
    "HF_HUB_OFFLINE": "huggingface_hub.constants",
    "XDG_CACHE_HOME": "neuronguard.models.artifact.io",
}


def test_environment_holds_only_variables_the_server_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuronguard.server.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    known = {prefix + name.upper() for name in Settings.model_fields}
    for name in env():
        if name.startswith(prefix):
            assert name in known, f"{name} is not a setting of `neuronguard serve`"
        else:
            assert name in OTHER_VARIABLES, f"{name}: nothing reads it"
            assert name in inspect.getsource(importlib.import_module(OTHER_VARIABLES[name])), name
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, item in env().items():
        if name.startswith(prefix) and "value" in item:
            monkeypatch.setenv(name, item["value"])
    Settings()  # every value parses as the server parses it


def test_settings_point_into_the_mounted_volumes() -> None:
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    for name in ("NEURONGUARD_MODEL", "NEURONGUARD_BUNDLE", "NEURONGUARD_PATCH_SOURCE", "HF_HOME", "XDG_CACHE_HOME"):
        value = env_value(name)
        assert value, f"{name} is set"
        mount = next((m for path, m in mounts.items() if value == path or value.startswith(path + "/")), None)
        assert mount, f"{name}={value} is on no volume"
        if name in ("NEURONGUARD_MODEL", "NEURONGUARD_BUNDLE", "NEURONGUARD_PATCH_SOURCE"):
            assert mount.get("readOnly"), f"{mount['mountPath']} is mounted read-only"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert {m["name"] for m in mounts.values()} == set(volumes)
    claims = {doc["metadata"]["name"] for doc in manifests() if doc["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} == claims


def test_drain_fits_in_the_termination_grace_period() -> None:
    """SIGKILL comes terminationGracePeriodSeconds after termination starts, preStop included. The
    server drains HTTP for graceful_shutdown_s, then the batching engine for up to as long again,
    then stops the serial worker (`Scheduler.close`'s default timeout)."""
    from neuronguard.server.scheduler import Scheduler

    grace = setting("graceful_shutdown_s")
    drain = grace + (grace if setting("engine") == "batched" else 0)
    drain += inspect.signature(Scheduler.close).parameters["timeout_s"].default
    assert pod_spec()["terminationGracePeriodSeconds"] > pre_stop_seconds() + drain


def test_image_and_user_are_the_ones_built_here() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert container()["image"] == services["neuronguard"]["image"]
    user = re.search(r"^USER (\d+)(?::(\d+))?$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile sets a numeric USER"
    context = pod_spec()["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] == int(user.group(1))
    assert context["runAsGroup"] == int(user.group(2) or user.group(1))


def test_each_replica_requests_a_gpu_per_tensor_parallel_rank() -> None:
    resources = container()["resources"]
    gpus = resources["requests"]["nvidia.com/gpu"]
    assert gpus == resources["limits"]["nvidia.com/gpu"] == setting("tensor_parallel_size")
    assert setting("device").startswith("cuda")


# --------------------------------------------------------------------------- autoscaling


def hpa_metrics() -> list[dict[str, Any]]:
    return resource("HorizontalPodAutoscaler")["spec"]["metrics"]


def test_hpa_metric_is_an_adapter_rule_on_a_gauge_the_server_exports() -> None:
    types = server_metric_types()
    published = {}
    for rule in adapter_rules():
        series = series_name(rule)
        assert types.get(series) == "gauge", f"{series} is not a gauge of server/metrics.py"
        name = adapter_metric_name(rule, series)
        assert name, f"the rule's name.matches does not match {series}"
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
        assert all(f"<<.{part}>>" in rule["metricsQuery"] for part in ("Series", "LabelMatchers", "GroupBy"))
        published[name] = series
    assert hpa_metrics(), "the HPA scales on a metric"
    for metric in hpa_metrics():
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in published, f"no adapter rule publishes {name} (rules publish {sorted(published)})"
        assert metric["pods"]["target"]["type"] == "AverageValue"


def test_hpa_target_is_below_what_a_replica_takes() -> None:
    """Running requests reach max_queue on the batching engine (then 503), 1 on the serial worker."""
    capacity = setting("max_queue") if setting("engine") == "batched" else 1
    for metric in hpa_metrics():
        assert 0 < quantity(metric["pods"]["target"]["averageValue"]) < capacity


def test_scale_down_waits_for_each_replica_to_drain() -> None:
    scale_down = resource("HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"]
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert all(policy["periodSeconds"] > grace for policy in scale_down["policies"])
