"""Issue 25, acceptance: an oversized record never blocks its partition. An inbound record of
1,040,000 bytes (above librdkafka's `message.max.bytes`, below the broker's limit) is
dead-lettered without its body, and the 60 records behind it on the same partition are routed
exactly once within a minute. Judged from outside: a read_committed reader over every output."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.toolkit import produce, read_outputs, running_worker
from tests.support import scenario
from tests.support.kafka import TopicSet

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
BIG_BYTES = 1_040_000
BEHIND = 60
#: Room for the big record and its batch framing on the input topic and the test's producer.
INPUT_MAX_BYTES = 1_100_000


def _input_topic(bootstrap: str, name: str) -> None:
    """One partition, so every record is behind the big one; it accepts the big record."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, 1, 1, config={"max.message.bytes": str(INPUT_MAX_BYTES)})
    for f in admin.create_topics([topic]).values():
        f.result(30)


def _wait_for_topics(bootstrap: str, names: list[str]) -> None:
    """The worker creates its output topics; the reader needs their partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 60
    while set(names) - set(admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, "the worker did not create its output topics"
        time.sleep(0.2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_a_record_too_large_to_dead_letter_whole_does_not_block_its_partition(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path, delivery: str
) -> None:
    # Given a 1,040,000-byte record followed by 60 ordinary ones on one partition
    topics = TopicSet.fresh()
    _input_topic(kafka_bootstrap, topics.input)
    big = scenario.sized_inbound(BIG_BYTES)
    headers = [("trace-id", b"big"), ("tenant", b"acme")]
    messages = [(b"big", big, headers)]
    expected = {"big": scenario.Expected(b"big", "dlq", "too_large")}
    for i in range(BEHIND):
        ident = f"m{i:03d}"
        text, suffix = scenario.VALID[i % len(scenario.VALID)]
        value = json.dumps({"id": ident, "text": text}).encode()
        messages.append((ident.encode(), value, [("trace-id", ident.encode()), ("tenant", b"acme")]))
        expected[ident] = scenario.Expected(ident.encode(), suffix, None)
    produce(kafka_bootstrap, topics.input, messages, config={"message.max.bytes": INPUT_MAX_BYTES})
    env = {
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_DELIVERY": delivery,
        "CW_TOPICS__PARTITIONS": "1",
        "CW_METRICS__PORT": "0",
    }

    # When a worker with the default limits starts on it
    started = time.monotonic()
    with running_worker(env, tmp_path / "worker.log"):
        _wait_for_topics(kafka_bootstrap, topics.outputs(CATEGORIES))
        received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=1 + BEHIND, timeout_s=60)
        elapsed_s = time.monotonic() - started

    # Then every record is on its topic exactly once, within a minute of the worker's start
    log_tail = (tmp_path / "worker.log").read_text(errors="replace")[-2000:]
    assert len(received) == 1 + BEHIND, f"{len(received)} of {1 + BEHIND} outputs in {elapsed_s:.0f} s:\n{log_tail}"
    scenario.check(received, expected, topics.prefix, topics.dlq)
    assert elapsed_s < 60
    # And the dead letter kept no body, but its size and hash, and the original key and headers
    (dead,) = [r for r in received if r.key == b"big"]
    assert dead.value is None
    assert dead.headers["error.value_bytes"] == str(BIG_BYTES).encode()
    assert dead.headers["error.value_sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert dead.headers["source.offset"] == b"0"
