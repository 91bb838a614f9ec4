"""The alert rules the chart and the compose stack ship: well-formed, covering what operators
need, each classify_* selector scoped by job, one file for both (the chart narrows the job to
its release). That each metric and label exists is checked against a running worker in
tests/integration/test_dashboard_metrics.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "classify-worker"
ALERTS = CHART / "files" / "alerts.yaml"
HELM = shutil.which("helm") or (str(ROOT / ".tools" / "helm") if (ROOT / ".tools" / "helm").exists() else None)
JOB = 'job="classify-worker"'


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_rules_are_well_formed_and_cover_lag_dead_letters_progress_and_model_changes() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names), "alert names are unique"
    assert {
        "ClassifyConsumerLagGrowing",
        "ClassifyDeadLetterRateHigh",
        "ClassifyWorkerNotProgressing",
        "ClassifyModelChanged",
    } <= set(names)
    for r in rules:
        assert re.fullmatch(r"Classify[A-Z][A-Za-z]+", r["alert"]), r["alert"]
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", r.get("for", "0m")), r["alert"]
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]


def test_every_classify_selector_is_scoped_by_job_so_the_chart_can_narrow_it() -> None:
    for r in _rules():
        selectors = re.findall(r"\b(classify_[a-z_]+)(\{[^}]*\})?", r["expr"])
        assert selectors, r["alert"]
        unscoped = [name for name, matchers in selectors if JOB not in matchers]
        assert not unscoped, f"{r['alert']}: {unscoped} lack {JOB}"


def test_the_compose_prometheus_loads_the_same_file() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    (target,) = prometheus["rule_files"]
    assert f"./helm/classify-worker/files/alerts.yaml:{target}:ro" in mounts
    assert prometheus["scrape_configs"][0]["job_name"] == "classify-worker", "the rules' job matcher"


def _render(*args: str) -> list[dict]:
    assert HELM is not None
    out = subprocess.run([HELM, "template", "cw", str(CHART), *args], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.skipif(HELM is None, reason="helm is not installed (make test fetches it into .tools/)")
def test_the_chart_ships_the_rules_scoped_to_its_release_when_the_crd_exists() -> None:
    # Given a cluster with the Prometheus operator's CRDs
    docs = _render(
        "--api-versions", "monitoring.coreos.com/v1", "--namespace", "ml", "--set", "prometheusRule.labels.release=kps"
    )
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    scraped = [
        d for d in docs if d["kind"] == "Service" and any(p["name"] == "metrics" for p in d["spec"].get("ports", []))
    ]
    assert len(scraped) == 1, f"the ServiceMonitor would scrape {len(scraped)} Services per pod: {scraped}"
    service = scraped[0]
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")

    # Then the rules are the file's, each job matcher narrowed to this release's ServiceMonitor job
    assert rule["metadata"]["labels"]["release"] == "kps"
    scope = f'job="{service["metadata"]["name"]}", namespace="ml"'
    expected = yaml.safe_load(ALERTS.read_text().replace(JOB, scope))
    assert rule["spec"] == expected
    assert all(JOB not in r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "jobLabel" not in monitor["spec"], "the job label is the Service's name"


@pytest.mark.skipif(HELM is None, reason="helm is not installed")
def test_no_prometheus_rule_without_the_crd_or_when_disabled() -> None:
    assert not [d for d in _render() if d["kind"] == "PrometheusRule"]
    off = _render("--api-versions", "monitoring.coreos.com/v1", "--set", "prometheusRule.enabled=false")
    assert not [d for d in off if d["kind"] == "PrometheusRule"]
