"""Issue 25, defect 9, on the real broker: the per-topic check tells an existing topic from a
missing one, as the engine's periodic check and `ensure_topics` need."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient

from tests.support.kafka import TopicSet, create_topic
from worker.topics import ensure_topics, missing_topics

pytestmark = pytest.mark.integration


def test_missing_topics_and_ensure_topics_on_the_broker(kafka_bootstrap: str) -> None:
    t = TopicSet.fresh()
    create_topic(kafka_bootstrap, t.input, 1)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert missing_topics(admin, [t.input, t.dlq]) == [t.dlq]
    assert ensure_topics(admin, [t.input, t.dlq], 1, 1) == [t.dlq]
    deadline = time.monotonic() + 10  # a new topic's metadata reaches the broker's cache shortly after
    while missing_topics(admin, [t.input, t.dlq]):
        assert time.monotonic() < deadline, "created topic still reported missing"
        time.sleep(0.2)
