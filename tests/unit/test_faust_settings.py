"""The Faust engine's mapping of librdkafka settings (CW_KAFKA__*) onto Faust and aiokafka: what
a Faust app built from them holds, and which settings are refused by name."""

from __future__ import annotations

import pytest

pytest.importorskip("faust", reason="needs the [faust] extra")

from worker.config import load_settings
from worker.engines.faust import create_app, kafka_options
from worker.errors import ConfigError


def test_common_client_settings_reach_the_faust_app() -> None:
    # Given the settings a confluent-engine user would set
    settings = load_settings(
        kafka={
            "config": {
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 2000,
                "max.poll.interval.ms": 120_000,
                "client.id": "router-7",
                "socket.timeout.ms": 45_000,
                "acks": "all",
            },
            "consumer_config": {"fetch.wait.max.ms": 50, "fetch.min.bytes": 10, "max.partition.fetch.bytes": 2_000_000},
            "producer_config": {"linger.ms": 20, "compression.type": "gzip", "delivery.timeout.ms": 90_000},
        },
        commit={"interval_ms": 250, "max_items": 500},
    )
    # When the Faust app is built from them
    conf = create_app(settings).conf
    # Then each one is there, in Faust's units
    assert (conf.broker_session_timeout, conf.broker_heartbeat_interval, conf.broker_max_poll_interval) == (6, 2, 120)
    assert (conf.broker_client_id, conf.broker_request_timeout) == ("router-7", 45)
    assert (conf.producer_linger, conf.producer_compression_type, conf.producer_request_timeout) == (0.02, "gzip", 90)
    assert (conf.producer_acks, conf.consumer_max_fetch_size) == (-1, 2_000_000)
    assert (conf.broker_commit_interval, conf.broker_commit_every) == (0.25, 500)
    # And the consumer arguments Faust has no setting for are kept for the aiokafka consumer
    assert kafka_options(settings).consumer == {
        "isolation_level": "read_committed",
        "fetch_max_wait_ms": 50,
        "fetch_min_bytes": 10,
    }


def test_defaults_match_the_confluent_engines() -> None:
    conf = create_app(load_settings(kafka={"instance_id": "w1", "session_timeout_ms": 7000})).conf
    assert (conf.broker_client_id, conf.broker_session_timeout, conf.producer_linger) == (
        "classify-worker-w1",
        7,
        0.005,
    )
    assert conf.consumer_auto_offset_reset == "earliest"
    assert kafka_options(load_settings()).consumer["fetch_max_wait_ms"] == 100  # CONSUMER_FETCH_DEFAULTS


def test_settings_without_an_equivalent_are_refused_by_name() -> None:
    settings = load_settings(
        kafka={
            "config": {"session.timeout.ms": 6000, "statistics.interval.ms": 1000},
            "consumer_config": {"queued.min.messages": 10},
            "producer_config": {"queue.buffering.max.kbytes": 1024},
        }
    )
    with pytest.raises(ConfigError) as e:
        kafka_options(settings)
    assert str(e.value) == (
        "the faust engine cannot apply these Kafka settings: consumer_config.queued.min.messages, "
        "producer_config.queue.buffering.max.kbytes, statistics.interval.ms"
    )


@pytest.mark.parametrize(
    ("config", "cause"),
    [
        ({"acks": 1}, "acks=1: the faust engine.s producer writes with acks=all"),
        ({"compression.type": "lz4"}, "cannot compress with lz4"),
    ],
)
def test_values_aiokafka_cannot_honour_are_refused(config: dict[str, object], cause: str) -> None:
    with pytest.raises(ConfigError, match=cause):
        kafka_options(load_settings(kafka={"config": config}))


def test_the_classifier_makes_the_apps_clients_read_committed_and_acks_all(tiny_bundle) -> None:
    from worker.engines.faust import FaustClassifier
    from worker.pipeline import build_pipeline

    # Given an app with the classifier added
    settings = load_settings(model={"path": tiny_bundle})
    app = create_app(settings)
    FaustClassifier(app, settings, build_pipeline(settings))
    # Then its producer writes with acks=all (not idempotent: aiokafka's idempotent producer
    # wedges a partition after a refused batch) and its consumer gets the overrides
    assert app.producer._settings_extra() == {"acks": "all", "enable_idempotence": False}
    assert app.consumer.overrides == {
        "isolation_level": "read_committed",
        "fetch_max_wait_ms": 100,
        "fetch_min_bytes": 1,
    }


def test_exactly_once_asked_for_is_refused_not_downgraded() -> None:
    # Given CW_DELIVERY=exactly_once set explicitly, When a Faust app is built, Then it is refused
    with pytest.raises(ConfigError, match="the faust engine is at-least-once: set CW_DELIVERY=at_least_once"):
        create_app(load_settings(delivery="exactly_once"))
    # And left at its default, or at at_least_once, it runs at-least-once
    assert create_app(load_settings()).conf.processing_guarantee.value == "at_least_once"
    assert create_app(load_settings(delivery="at_least_once")).conf.processing_guarantee.value == "at_least_once"


def test_exactly_once_on_trial_runs_fausts_exactly_once() -> None:
    # Given the trial flag (tests/chaos/test_faust_exactly_once.py), Then the app runs Faust's exactly_once
    settings = load_settings(delivery="exactly_once", faust_eos_trial=True)
    assert create_app(settings).conf.processing_guarantee.value == "exactly_once"
