"""Deployment artifacts checked without Docker or a cluster: Helm values against their schema,
template paths against values, compose and chart env names against Settings, dashboard queries
against the metrics the code registers. `helm` runs too when present. The Dockerfile and the
compose file's validation by Docker Compose: test_container_files.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from worker.config import Settings
from worker.observability import PrometheusHooks

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "classify-worker"


def _setting_exists(env_name: str) -> bool:
    """CW_KAFKA__GROUP_ID → Settings.kafka.group_id"""
    model: type = Settings
    parts = env_name.removeprefix("CW_").lower().split("__")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        annotation = fields[part].annotation
        if i < len(parts) - 1:
            model = annotation
    return env_name.startswith("CW_")


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_values_validate_against_the_schema() -> None:
    jsonschema.validate(_values(), json.loads((CHART / "values.schema.json").read_text()))


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        ({"delivery": "twice"}, "unknown delivery"),
        ({"workload": "DaemonSet"}, "unknown workload"),
        ({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}, "both autoscalers"),
        ({"batch": {"maxItems": 0}}, "empty batches"),
    ],
)
def test_schema_rejects_bad_values(patch: dict, why: str) -> None:
    values = _values()
    for key, value in patch.items():
        if isinstance(value, dict) and key in values:
            for sub, subvalue in value.items():
                values[key][sub] = {**values[key].get(sub, {}), **subvalue} if isinstance(subvalue, dict) else subvalue
        else:
            values[key] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, json.loads((CHART / "values.schema.json").read_text()))
        pytest.fail(f"schema accepted {why}")


def test_every_values_path_used_in_templates_exists() -> None:
    values = _values()
    missing = []
    for template in (CHART / "templates").glob("*"):
        for path in sorted(set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()))):
            node = values
            for part in path.strip(".").split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{template.name}: .Values{path}")
                    break
                node = node[part]
    assert not missing, missing


def test_chart_configmap_sets_only_real_settings() -> None:
    names = re.findall(r"^\s+(CW_[A-Z_]+):", (CHART / "templates" / "configmap.yaml").read_text(), re.M)
    names += re.findall(r"name: (CW_[A-Z_]+)", (CHART / "templates" / "workload.yaml").read_text())
    assert len(names) > 15
    assert [n for n in names if not _setting_exists(n)] == []


def test_compose_parses_and_uses_only_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "topic-init", "worker", "producer", "prometheus", "grafana"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1
    assert "kafka-broker-api-versions.sh" in " ".join(services["kafka"]["healthcheck"]["test"])
    env_names = {name for svc in services.values() for name in (svc.get("environment") or {}) if name.startswith("CW_")}
    assert env_names and [n for n in env_names if not _setting_exists(n)] == []


def test_dashboard_queries_only_registered_metrics() -> None:
    registry = CollectorRegistry()
    PrometheusHooks(registry)
    registered = {m.name for m in registry.collect()}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "classify-worker.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"classify_[a-z_]+", e)}
    assert used, "dashboard has no classify_* queries"
    assert used - registered == set(), f"dashboard queries unknown metrics; registered: {sorted(registered)}"
    assert {"classify_routed", "classify_end_to_end_seconds", "classify_consumer_lag"} <= used


HELM = shutil.which("helm") or (str(ROOT / ".tools" / "helm") if (ROOT / ".tools" / "helm").exists() else None)


@pytest.mark.skipif(HELM is None, reason="helm is not installed (make test fetches it into .tools/ when npm works)")
@pytest.mark.parametrize(
    ("extra", "kinds"),
    [
        ([], {"StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget", "ServiceAccount"}),
        (["--set", "workload=Deployment"], {"Deployment"}),
        (["--set", "autoscaling.keda.enabled=true"], {"ScaledObject"}),
        (["--set", "autoscaling.hpa.enabled=true"], {"HorizontalPodAutoscaler"}),
        (["--api-versions", "monitoring.coreos.com/v1"], {"ServiceMonitor"}),
    ],
)
def test_helm_lint_and_template(extra: list[str], kinds: set[str]) -> None:
    assert HELM is not None
    lint_args = [a for a in extra if a != "--api-versions" and "monitoring" not in a]  # lint has no --api-versions
    lint = subprocess.run([HELM, "lint", str(CHART), *lint_args], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = subprocess.run([HELM, "template", "cw", str(CHART), *extra], check=True, capture_output=True, text=True)
    rendered = set(re.findall(r"^kind: (\w+)", out.stdout, re.M))
    assert kinds <= rendered, f"missing {kinds - rendered}"
    assert ("ServiceMonitor" in rendered) == ("monitoring.coreos.com/v1" in extra), "ServiceMonitor needs its CRD"


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_tls_secrets_are_mounted_read_only_and_named_in_the_kafka_config() -> None:
    # Given SASL_SSL settings, a CA Secret and a client-certificate Secret
    assert HELM is not None
    sasl = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "classify"}
    args = [
        *("--set", "kafka.tls.caSecret.name=kafka-ca", "--set", "kafka.tls.caSecret.key=ca.pem"),
        *("--set", "kafka.tls.clientSecret.name=cw-client", "--set", "kafka.saslPasswordSecret.name=cw-sasl"),
        *("--set-json", f"kafka.config={json.dumps(sasl)}"),
    ]
    # When the chart renders
    out = subprocess.run([HELM, "template", "cw", str(CHART), *args], check=True, capture_output=True, text=True)
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret") for v in pod["volumes"]}
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    config = json.loads(docs["ConfigMap"]["data"]["CW_KAFKA__CONFIG"])

    # Then each Secret is a read-only volume, and the librdkafka settings name the mounted files
    assert volumes["kafka-ca"] == {
        "secretName": "kafka-ca",
        "defaultMode": 0o440,
        "items": [{"key": "ca.pem", "path": "ca.crt"}],
    }
    assert volumes["kafka-client-cert"]["items"] == [
        {"key": "tls.crt", "path": "tls.crt"},
        {"key": "tls.key", "path": "tls.key"},
    ]
    assert mounts["kafka-ca"]["readOnly"] and mounts["kafka-client-cert"]["readOnly"]
    assert config["ssl.ca.location"] == mounts["kafka-ca"]["mountPath"] + "/ca.crt"
    assert config["ssl.certificate.location"] == mounts["kafka-client-cert"]["mountPath"] + "/tls.crt"
    assert config["ssl.key.location"] == mounts["kafka-client-cert"]["mountPath"] + "/tls.key"
    assert {k: config[k] for k in sasl} == sasl
    # And the password comes from its Secret, never from values or the ConfigMap
    password = next(e for e in container["env"] if e["name"] == "CW_KAFKA__SASL_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "cw-sasl", "key": "password"}
    # And the settings the worker reads from it are valid, with the same files
    security = Settings(kafka={"config": config}).kafka.security()
    assert (security.protocol, str(security.ca_location)) == ("SASL_SSL", config["ssl.ca.location"])


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_without_tls_secrets_nothing_is_mounted_and_the_config_is_as_given() -> None:
    assert HELM is not None
    out = subprocess.run([HELM, "template", "cw", str(CHART)], check=True, capture_output=True, text=True)
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert [v["name"] for v in docs["StatefulSet"]["spec"]["template"]["spec"]["volumes"]] == ["tmp"]
    assert json.loads(docs["ConfigMap"]["data"]["CW_KAFKA__CONFIG"]) == {}


def test_notes_list_the_least_privilege_acls() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for row in [
        "READ + DESCRIBE    topic             {{ .Values.topics.input }}",
        "READ               group             {{ .Values.kafka.groupId }}",
        "WRITE + DESCRIBE   topic             prefix {{ .Values.topics.prefix }}",
        "WRITE + DESCRIBE   topic             {{ .Values.topics.dlq }}",
        "WRITE + DESCRIBE   transactional-id  prefix {{ .Values.kafka.groupId }}-",
        "CREATE             topic",
    ]:
        assert row in notes, row


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_helm_refuses_hpa_and_keda_together() -> None:
    assert HELM is not None
    both = ["--set", "autoscaling.hpa.enabled=true", "--set", "autoscaling.keda.enabled=true"]
    out = subprocess.run([HELM, "template", "cw", str(CHART), *both], capture_output=True, text=True, check=False)
    assert out.returncode != 0


def _render(*extra: str) -> list[dict]:
    assert HELM is not None
    out = subprocess.run([HELM, "template", "cw", str(CHART), *extra], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _workload(docs: list[dict]) -> dict:
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    return workload


def _pod_and_env(docs: list[dict]) -> tuple[dict, dict]:
    pod = _workload(docs)["spec"]["template"]["spec"]
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    return pod, env


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_helm_brings_your_own_model_from_an_image() -> None:
    pod, env = _pod_and_env(
        _render("--set", "model.image.repository=reg.example/m", "--set-string", "model.image.tag=3")
    )
    init = pod["initContainers"][0]
    assert init["image"] == "reg.example/m:3" and init["command"] == ["cp", "-R", "/model/.", "/models/bundle/"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    worker = pod["containers"][0]
    assert {"name": "model", "mountPath": "/models/bundle", "readOnly": True} in worker["volumeMounts"]
    assert {"name": "model", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    assert env["CW_MODEL__PATH"] == "/models/bundle"


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_helm_brings_your_own_model_from_a_claim() -> None:
    pod, env = _pod_and_env(_render("--set", "model.existingClaim=models", "--set", "model.subPath=v3"))
    assert "initContainers" not in pod
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models/bundle", "readOnly": True, "subPath": "v3"}
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert env["CW_MODEL__PATH"] == "/models/bundle"


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_helm_default_uses_the_model_in_the_image_and_refuses_two_sources() -> None:
    pod, env = _pod_and_env(_render())
    assert "CW_MODEL__PATH" not in env and "initContainers" not in pod
    both = ["--set", "model.existingClaim=x", "--set", "model.image.repository=y"]
    out = subprocess.run([HELM, "template", "cw", str(CHART), *both], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "at most one of model.image.repository and model.existingClaim" in out.stderr


def _worker_env(docs: list[dict]) -> dict[str, dict]:
    pod = _workload(docs)["spec"]["template"]["spec"]
    return {e["name"]: e for e in pod["containers"][0]["env"]}


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_inference_threads_follow_the_pods_cpu_not_the_nodes() -> None:
    # Without a CPU limit there is no quota to read, and the affinity mask is the node's: the request
    by_request = _worker_env(_render())["CW_MODEL__THREADS"]
    assert by_request["valueFrom"]["resourceFieldRef"] == {
        "containerName": "worker",
        "resource": "requests.cpu",
        "divisor": "1",
    }
    # With a limit the worker reads its cgroup quota itself; an explicit value wins over both
    assert "CW_MODEL__THREADS" not in _worker_env(_render("--set", "resources.limits.cpu=4"))
    assert _worker_env(_render("--set", "model.threads=3"))["CW_MODEL__THREADS"]["value"] == "3"


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_default_workload_gives_each_replica_a_stable_transactional_id() -> None:
    # Given the chart's defaults
    docs = _render()
    workload = _workload(docs)
    # Then replicas are a StatefulSet: a rescheduled pod keeps its name, hence its transactional id
    # (<group>-<pod name>), and fences its predecessor's open transaction at once
    assert workload["kind"] == "StatefulSet"
    instance = _worker_env(docs)["CW_KAFKA__INSTANCE_ID"]
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # And its governing Service exists and is headless, as a StatefulSet's must be
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == workload["spec"]["serviceName"]
    )
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
@pytest.mark.parametrize("scaler", ["keda", "hpa"])
def test_autoscalers_point_at_the_workload_the_chart_renders(kind: str, scaler: str) -> None:
    docs = _render("--set", f"workload={kind}", "--set", f"autoscaling.{scaler}.enabled=true")
    workload = _workload(docs)
    (target,) = [d["spec"]["scaleTargetRef"] for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        workload["kind"],
        workload["metadata"]["name"],
    )
    assert workload["kind"] == kind and "replicas" not in workload["spec"], "the autoscaler owns the replica count"
    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == (kind == "StatefulSet")


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
@pytest.mark.parametrize(
    ("args", "grace_s"),
    [
        ([], 60 + 10 + 20),  # defaults: 60 s transaction, 10 s session
        (["--set", "kafka.transactionTimeoutMs=30000"], 30 + 10 + 20),
        (["--set", "kafka.transactionTimeoutMs=900000"], 60 + 10 + 20),  # 2 x 30 s call timeouts cap a commit
        (["--set", "kafka.sessionTimeoutMs=45000"], 60 + 45 + 20),
        (["--set", "kafka.transactionTimeoutMs=1500"], 2 + 10 + 20),  # rounded up
        (["--set", "terminationGracePeriodSeconds=200"], 200),
    ],
)
def test_grace_period_is_sized_from_the_timeouts_a_shutdown_waits_on(args: list[str], grace_s: int) -> None:
    docs = _render(*args)
    assert _workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace_s
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    values = _values()["kafka"]
    transaction_ms = next(
        (a.split("=")[1] for a in args if "transactionTimeoutMs" in a), values["transactionTimeoutMs"]
    )
    assert env["CW_KAFKA__TRANSACTION_TIMEOUT_MS"] == str(transaction_ms), (
        "the worker uses the timeout the grace assumes"
    )
