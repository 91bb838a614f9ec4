"""The dashboard and the alert rules cannot drift from the code: every query of a Grafana panel
and of a Prometheus rule parses (with the Prometheus project's own PromQL grammar), and every
metric it names exists in the /metrics of a running worker with every label it matches on,
groups by or joins on — labels that only the scraper adds (job, instance, ...) aside."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devkit.ports import free_port
from devkit.toolkit import read_outputs, start_worker, stop_worker
from tests.support import scenario
from tests.support.interop import NODE_SRC, node_modules
from tests.support.kafka import TopicSet, create_topic, produce, wait_for_log

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "classify-worker.json"
ALERTS = ROOT / "helm" / "classify-worker" / "files" / "alerts.yaml"
CATEGORIES = ["banking", "travel", "weather"]
#: Added by Prometheus (target labels) or the Prometheus operator's ServiceMonitor, never by us.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load(ALERTS.read_text())
    out += [(f"rule {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return out


def analyse(exprs: list[str]) -> list[dict[str, Any]]:
    """Selectors and grouping clauses of each expression, from tests/support/node/promql-selectors.js."""
    done = subprocess.run(
        ["node", str(NODE_SRC / "promql-selectors.js")],
        input=json.dumps(exprs),
        env={"NODE_PATH": str(node_modules()), "PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def exported(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """Sample names with the label names they carry, and names declared without samples yet."""
    samples: dict[str, set[str]] = {}
    declared: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        declared |= {family.name + s for s in suffixes.get(family.type, [""])}
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    return samples, declared - set(samples)


def problems_in(where: str, a: dict[str, Any], samples: dict[str, set[str]], declared: set[str]) -> list[str]:
    out = [f"{where}: {e} in {a['expr']!r}" for e in a["errors"]]
    for sel in a["selectors"]:
        name = sel["name"]
        if name not in samples and name not in declared:
            out.append(f"{where}: {name} is not in /metrics")
            continue
        for label in set(sel["labels"]) - TARGET_LABELS - samples.get(name, set()):
            out.append(f"{where}: {name} has no label {label!r} (labels: {sorted(samples.get(name, []))})")
    for g in a["groupings"]:
        for name in g["selectors"]:
            if name not in samples:  # not exported at all: named above
                if name in declared and set(g["labels"]) - TARGET_LABELS:
                    out.append(f"{where}: {name} has no samples yet to check {g['labels']} on (extend the traffic)")
                continue
            missing = set(g["labels"]) - TARGET_LABELS - samples.get(name, set())
            if missing:
                out.append(f"{where}: {g['clause']} {sorted(missing)} but {name} has {sorted(samples.get(name, []))}")
    return out


def test_every_query_names_only_metrics_and_labels_a_running_worker_exports(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given every panel and rule query, parsed
    where, exprs = zip(*queries(), strict=True)
    assert len(exprs) >= 15, "the dashboard and the rules hold at least 15 queries"
    analysed = analyse(list(exprs))

    # And a worker that has routed, fallen back and dead-lettered a mixed stream
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 3)
    port = free_port()
    env = {
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_METRICS__PORT": str(port),
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
    }
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        wait_for_log(log, "partitions assigned")
        messages, expected = scenario.build(300)
        produce(kafka_bootstrap, topics.input, messages)
        assert len(read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), len(expected), quiet_s=0.2)) == 300

        # When /metrics is scraped once the lag has been measured too
        deadline, text = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "classify_consumer_lag{" not in text:
            time.sleep(0.5)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
    finally:
        stop_worker(worker)

    # Then every metric and label the queries use is there
    samples, declared = exported(text)
    problems = [p for w, a in zip(where, analysed, strict=True) for p in problems_in(w, a, samples, declared)]
    assert not problems, "\n".join(problems)
