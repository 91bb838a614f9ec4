"""The newcomer's path: `make demo` end to end on its embedded Tansu broker (the one smoke test on
that broker), and the CLI's failure modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.toolkit import read_outputs
from tests.support.kafka import create_topic, run_cli

pytestmark = pytest.mark.integration


def test_demo_routes_every_message_exactly_once_on_its_embedded_broker(tiny_bundle: Path) -> None:
    env = {"CW_MODEL__PATH": str(tiny_bundle)}
    result = run_cli(env, "demo", timeout_s=180, module="devkit")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "every message routed exactly once" in out
    assert "284 (0 / 0)" in out and "2272 (0 / 0)" in out
    for reason in ("empty_text=1", "encoding=1", "invalid_json=2", "not_an_object=1", "null_value=1", "schema=2"):
        assert reason in out, f"demo summary lacks dead-letter count {reason}"


def test_invalid_settings_exit_2_with_one_line() -> None:
    result = run_cli({"CW_BATCH__MAX_ITEMS": "lots"}, "run", timeout_s=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CW_BATCH__MAX_ITEMS" in lines[0], result.stderr


def test_eval_rejects_an_unknown_split() -> None:
    result = run_cli({}, "eval", "--data", "whatever.json", "--split", "training", timeout_s=60)
    assert result.returncode == 2 and "'training' is not one of" in result.stderr, result.stderr


def test_missing_model_exits_3_naming_the_path(tmp_path: Path) -> None:
    result = run_cli({"CW_MODEL__PATH": str(tmp_path / "nope")}, "classify", "hello", timeout_s=60)
    assert result.returncode == 3
    assert str(tmp_path / "nope") in result.stderr


def test_classify_prints_routed_json_lines(tiny_bundle: Path) -> None:
    result = run_cli({"CW_MODEL__PATH": str(tiny_bundle)}, "classify", "my balance", "", timeout_s=60)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert '"category":"banking"' in first
    assert '"error":"empty_text"' in second


def test_sample_traffic_sends_the_requested_count(kafka_bootstrap: str, tmp_path: Path) -> None:

    topic = f"sample-{tmp_path.name}"
    create_topic(kafka_bootstrap, topic, 1)
    env = {"CW_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "CW_TOPICS__INPUT": topic}
    result = run_cli(env, "sample-traffic", "--rate", "500", "--count", "300", timeout_s=60, module="devkit")
    assert result.returncode == 0, result.stderr
    got = read_outputs(kafka_bootstrap, [topic], expect=300, timeout_s=30)
    keys = [o.key for o in got]
    assert len(keys) == 300 and len(set(keys)) == 300, "each sample message once, unique keys across cycles"
