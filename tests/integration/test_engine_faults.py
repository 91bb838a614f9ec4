"""The confluent engine in-process against a real broker, with faults injected where a
subprocess cannot reach: a classifier that fails on whole batches, an output topic deleted
mid-run."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from devkit.toolkit import read_outputs
from tests.support import scenario
from tests.support.engine import in_process_engine
from tests.support.kafka import TopicSet, create_topic, produce
from worker.engines.confluent import ConfluentEngine
from worker.errors import InferenceError
from worker.housekeeping import TOPIC_CHECK_INTERVAL_S
from worker.observability import PrometheusHooks

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[TopicSet]:
    t = TopicSet.fresh()
    create_topic(kafka_bootstrap, t.input, 3)
    yield t


def _engine(kafka_bootstrap: str, topics: TopicSet, bundle: Path) -> tuple[ConfluentEngine, PrometheusHooks]:
    return in_process_engine(kafka_bootstrap, topics, bundle)


def test_classifier_failure_commits_nothing_retries_with_backoff_and_recovers(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given a classifier that fails on its first three batches
    engine, hooks = _engine(kafka_bootstrap, topics, tiny_bundle)
    real_predict = engine.pipeline.classifier.encode
    failures = []

    def flaky(texts: list[str]) -> object:
        if len(failures) < 3:
            failures.append(time.monotonic())
            raise InferenceError("simulated onnxruntime failure")
        return real_predict(texts)

    engine.pipeline.classifier.encode = flaky  # type: ignore[method-assign]
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)

    # When the engine runs until every message is committed
    engine.run(max_messages=300, idle_exit_s=30)

    # Then each failure was retried after a growing pause, counted, and nothing was lost or doubled
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert len(failures) == 3 and gaps[1] > gaps[0] >= 0.5, f"retry gaps {gaps}"
    assert hooks.failures.labels("inference")._value.get() == 3
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=300)
    scenario.check(received, expected, topics.prefix, topics.dlq)


def test_deleted_output_topic_is_recreated_not_skipped(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given a running engine that has routed a first wave
    engine, _hooks = _engine(kafka_bootstrap, topics, tiny_bundle)
    runner = threading.Thread(target=engine.run, kwargs={"max_messages": 400, "idle_exit_s": 90})
    messages, expected = scenario.build(400)
    produce(kafka_bootstrap, topics.input, messages[:200])
    runner.start()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        deadline = time.monotonic() + 30
        while set(topics.outputs(CATEGORIES)) - set(admin.list_topics(timeout=10).topics):
            assert time.monotonic() < deadline, "engine did not create its output topics"
            time.sleep(0.2)
        assert len(read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=200)) == 200

        # When a category topic is deleted under it
        banking = topics.prefix + "banking"
        for f in admin.delete_topics([banking]).values():
            f.result(30)
        deleted_at = time.monotonic()
        assert banking not in admin.list_topics(timeout=10).topics

        # Then the worker recreates it within its check interval, and routes new traffic to it
        while banking not in admin.list_topics(timeout=10).topics:
            assert time.monotonic() - deleted_at < TOPIC_CHECK_INTERVAL_S + 20, "deleted topic never recreated"
            time.sleep(0.5)
        produce(kafka_bootstrap, topics.input, messages[200:])
        runner.join(120)
        assert not runner.is_alive(), "engine did not finish the second wave"
    finally:
        engine.request_stop()
        runner.join(30)
    second_keys = {k.decode() for k, _v, _h in messages[200:] if k}
    second = {k: e for k, e in expected.items() if k in second_keys}
    received = [
        o
        for o in read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=200)
        if o.key and o.key.decode() in second_keys
    ]
    scenario.check(received, second, topics.prefix, topics.dlq)
