from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_settings
from worker.errors import ConfigError

CONTRACT_ENV = {
    "CW_KAFKA__BOOTSTRAP_SERVERS": ("kafka.bootstrap_servers", "b1:9092,b2:9092", "b1:9092,b2:9092"),
    "CW_KAFKA__GROUP_ID": ("kafka.group_id", "g", "g"),
    "CW_KAFKA__CONFIG": ("kafka.config", '{"security.protocol": "SASL_SSL"}', {"security.protocol": "SASL_SSL"}),
    "CW_KAFKA__CONSUMER_CONFIG": ("kafka.consumer_config", '{"fetch.wait.max.ms": 10}', {"fetch.wait.max.ms": 10}),
    "CW_KAFKA__PRODUCER_CONFIG": ("kafka.producer_config", '{"linger.ms": 1}', {"linger.ms": 1}),
    "CW_KAFKA__INSTANCE_ID": ("kafka.instance_id", "pod-0", "pod-0"),
    "CW_TOPICS__INPUT": ("topics.input", "in", "in"),
    "CW_TOPICS__PREFIX": ("topics.prefix", "r.", "r."),
    "CW_TOPICS__FALLBACK": ("topics.fallback", "fb", "fb"),
    "CW_TOPICS__DLQ": ("topics.dlq", "dl", "dl"),
    "CW_TOPICS__PARTITIONS": ("topics.partitions", "12", 12),
    "CW_TOPICS__REPLICATION": ("topics.replication", "3", 3),
    "CW_BATCH__MAX_ITEMS": ("batch.max_items", "64", 64),
    "CW_BATCH__MAX_WAIT_MS": ("batch.max_wait_ms", "5", 5),
    "CW_MODEL__PATH": ("model.path", "/models/x", Path("/models/x")),
    "CW_LIMITS__MAX_CHUNKS": ("limits.max_chunks", "4", 4),
    "CW_LIMITS__OVER_MAX_CHUNKS": ("limits.over_max_chunks", "dead_letter", "dead_letter"),
    "CW_ROUTING__THRESHOLD": ("routing.threshold", "0.4", 0.4),
    "CW_DELIVERY": ("delivery", "at_least_once", "at_least_once"),
    "CW_METRICS__PORT": ("metrics.port", "9200", 9200),
}


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_defaults_match_the_documented_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONTRACT_ENV:
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert (s.kafka.group_id, s.topics.input, s.topics.prefix, s.topics.fallback, s.topics.dlq) == (
        "classify-worker",
        "classify.in",
        "routed.",
        "routed.fallback",
        "classify.dlq",
    )
    assert (s.topics.partitions, s.topics.replication, s.batch.max_items, s.batch.max_wait_ms) == (6, 1, 256, 5)
    assert (s.model.path, s.routing.threshold, s.delivery, s.metrics.port) == (None, None, "exactly_once", 9108)


@pytest.mark.parametrize("env_name", sorted(CONTRACT_ENV))
def test_every_public_env_name_is_read(monkeypatch: pytest.MonkeyPatch, env_name: str) -> None:
    attr, raw, expected = CONTRACT_ENV[env_name]
    monkeypatch.setenv(env_name, raw)
    assert _get(load_settings(), attr) == expected, f"{env_name} did not set {attr}"


@pytest.mark.parametrize(
    ("env_name", "value"),
    [
        ("CW_BATCH__MAX_ITEMS", "lots"),
        ("CW_DELIVERY", "maybe"),
        ("CW_ROUTING__THRESHOLD", "1.5"),
        ("CW_KAFKA__CONFIG", "not json"),
        ("CW_TOPICS__PARTITIONS", "0"),
    ],
)
def test_invalid_settings_raise_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env_name: str, value: str
) -> None:
    monkeypatch.setenv(env_name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "\n" not in str(info.value)
    assert env_name.removeprefix("CW_").split("__")[0] in str(info.value).upper()


def test_yaml_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "worker.yaml"
    cfg.write_text("topics:\n  input: from-file\n  dlq: dlq-file\nbatch:\n  max_items: 32\n")
    monkeypatch.setenv("CW_TOPICS__DLQ", "dlq-env")
    s = load_settings(cfg)
    assert (s.topics.input, s.topics.dlq, s.batch.max_items) == ("from-file", "dlq-env", 32)


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_user_librdkafka_config_cannot_break_delivery_guarantees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CW_KAFKA__CONFIG",
        '{"enable.auto.commit": true, "isolation.level": "read_uncommitted", "enable.idempotence": false,'
        ' "linger.ms": 50, "sasl.mechanism": "PLAIN"}',
    )
    monkeypatch.setenv("CW_KAFKA__INSTANCE_ID", "pod-7")
    s = load_settings()
    consumer, producer = s.librdkafka_consumer(), s.librdkafka_producer()
    assert consumer["enable.auto.commit"] is False
    assert consumer["isolation.level"] == "read_committed"
    assert producer["enable.idempotence"] is True
    assert producer["linger.ms"] == 50, "user tuning must override our defaults"
    assert producer["sasl.mechanism"] == "PLAIN"
    assert producer["transactional.id"] == "classify-worker-pod-7"


def test_at_least_once_has_no_transactional_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CW_DELIVERY", "at_least_once")
    assert "transactional.id" not in load_settings().librdkafka_producer()


def test_sasl_password_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CW_KAFKA__SASL_PASSWORD", "hunter2")
    s = load_settings()
    assert "hunter2" not in repr(s)
    assert s.librdkafka_producer()["sasl.password"] == "hunter2"


def test_consumer_fetch_defaults_and_commit_interval_are_overridable() -> None:
    defaults = load_settings()
    assert defaults.librdkafka_consumer()["fetch.wait.max.ms"] == 100
    assert (defaults.commit.interval_ms, defaults.commit.max_items) == (50, 2000)
    tuned = load_settings(kafka={"consumer_config": {"fetch.wait.max.ms": 10}}, commit={"interval_ms": 20})
    assert tuned.librdkafka_consumer()["fetch.wait.max.ms"] == 10 and tuned.commit.interval_ms == 20
