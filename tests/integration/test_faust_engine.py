"""The Faust engine's own guarantees on a real broker, judged from outside (a read_committed
reader over every output): it reads only committed input, loses nothing when a send fails (an
output too large, an output topic missing), and keeps a header's null value null."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.toolkit import read_outputs, start_worker
from tests.support import scenario
from tests.support.kafka import TopicSet, create_topic, produce, wait_for_log

pytest.importorskip("faust", reason="needs the [faust] extra")
pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
PARTITIONS = 3


def _env(topics: TopicSet, bootstrap: str, bundle: Path, **extra: str) -> dict[str, str]:
    return {
        **topics.env(bootstrap),
        "CW_MODEL__PATH": str(bundle),
        "CW_KAFKA__INSTANCE_ID": "f1",
        "CW_DELIVERY": "at_least_once",
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_TOPICS__PARTITIONS": str(PARTITIONS),
        "CW_METRICS__PORT": "0",
        **extra,
    }


def _valid(ids: range, tag: str) -> list[tuple[bytes, bytes]]:
    text, _ = scenario.VALID[0]
    return [(f"{tag}{i:04d}".encode(), json.dumps({"id": f"{tag}{i:04d}", "text": text}).encode()) for i in ids]


def _transaction(producer: Producer, topic: str, messages: list[tuple[bytes, bytes]], commit: bool) -> None:
    producer.begin_transaction()
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def test_only_committed_input_is_routed(kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path) -> None:
    # Given a transactional upstream that aborts 30 messages and commits 30 others, interleaved
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    upstream = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"up-{uuid.uuid4().hex}"})
    upstream.init_transactions(30)
    aborted, committed = _valid(range(30), "aborted-"), _valid(range(30), "committed-")
    for i in range(3):
        _transaction(upstream, topics.input, aborted[i * 10 : (i + 1) * 10], commit=False)
        _transaction(upstream, topics.input, committed[i * 10 : (i + 1) * 10], commit=True)

    # When the Faust engine runs until the stream is idle
    log = tmp_path / "faust.log"
    worker = start_worker(_env(topics, kafka_bootstrap, tiny_bundle), log, "--engine", "faust", "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then exactly the 30 committed messages were routed, none of the aborted ones
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=30, quiet_s=2.0)
    keys = sorted({(r.key or b"").decode() for r in received})
    routed_aborted = [k for k in keys if k.startswith("aborted-")]
    assert routed_aborted == [], f"{len(routed_aborted)} aborted messages routed: {routed_aborted[:5]}"
    assert keys == sorted(k.decode() for k, _ in committed), f"routed {keys}"


#: The category topics' `max.message.bytes` in the too-large test: below the producer's limit, so
#: the pipeline (which sizes records against the producer) routes the output and only the broker
#: refuses it, mid-batch.
TOPIC_LIMIT = 300_000


def _oversized_output() -> bytes:
    """A valid input whose routed value is over `TOPIC_LIMIT` and far under the producer's limit."""
    text, _ = scenario.VALID[0]
    return json.dumps({"id": "huge", "text": text, "meta": {"pad": "x" * (TOPIC_LIMIT + 50_000)}}).encode()


def test_an_output_too_large_for_its_topic_loses_nothing(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given output topics whose limit is below the producer's, and 300 messages of which one, in
    # the middle of a batch, has a routed output the broker refuses
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 1)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    limited = [
        NewTopic(t, PARTITIONS, 1, config={"max.message.bytes": str(TOPIC_LIMIT)}) for t in topics.outputs(CATEGORIES)
    ]
    for f in admin.create_topics(limited).values():
        f.result(30)
    messages, expected = scenario.build(300)
    # (without the scenario's own too-large input: the input limit here lets the huge one in)
    expected = {k: e for k, e in expected.items() if e.reason != "too_large"}
    messages = [m for m in messages if (m[0] or b"").decode() in expected]
    huge = (b"huge", _oversized_output(), [("trace-id", b"huge"), ("tenant", b"acme")])
    produce(kafka_bootstrap, topics.input, [*messages[:120], huge, *messages[120:]])

    # When the Faust engine runs in batches of 50 until the stream is idle
    env = _env(topics, kafka_bootstrap, tiny_bundle, CW_BATCH__MAX_ITEMS="50", CW_LIMITS__MAX_INPUT_BYTES="1000000")
    log = tmp_path / "faust.log"
    worker = start_worker(env, log, "--engine", "faust", "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then every other message was routed, and the huge one dead-lettered without its body
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected) + 1)
    dead = [r for r in received if r.key == b"huge"]
    scenario.check([r for r in received if r.key != b"huge"], expected, topics.prefix, topics.dlq, exactly_once=False)
    assert [(r.topic, r.value, r.headers.get("error.reason")) for r in dead] == [(topics.dlq, None, b"too_large")]
    assert dead[0].headers.get("trace-id") == b"huge" and dead[0].headers.get("source.offset") == b"120"
    assert dead[0].headers.get("error.value_bytes") == str(len(huge[1])).encode()


def test_a_null_header_value_stays_null(kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path) -> None:
    # Given messages carrying a header whose value is null beside ordinary ones
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    messages, expected = scenario.build(40)
    produce(kafka_bootstrap, topics.input, [(k, v, [*h, ("nothing", None)]) for k, v, h in messages])

    # When the Faust engine routes them
    log = tmp_path / "faust.log"
    worker = start_worker(_env(topics, kafka_bootstrap, tiny_bundle), log, "--engine", "faust", "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then every output, routed or dead-lettered, carries the header with a null value, not b""
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)
    wrong = {
        (r.key or b"").decode(): r.headers.get("nothing", "absent")
        for r in received
        if r.headers.get("nothing", "absent") is not None
    }
    assert wrong == {}, f"header 'nothing' should be null: {wrong}"


def test_sends_to_a_missing_output_topic_are_retried_until_it_exists(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given an operator-owned cluster (no auto-create) where one output topic is missing
    topics = TopicSet.fresh()
    for name in [topics.input, *topics.outputs(CATEGORIES)]:
        if name != topics.prefix + "travel":
            create_topic(kafka_bootstrap, name, PARTITIONS)
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)
    env = _env(
        topics,
        kafka_bootstrap,
        tiny_bundle,
        CW_TOPICS__AUTO_CREATE="false",
        CW_BATCH__MAX_ITEMS="50",
        CW_KAFKA__PRODUCER_CONFIG=json.dumps({"request.timeout.ms": 2000}),
    )

    # When the Faust engine runs, and the operator creates the topic 10 s later
    log = tmp_path / "faust.log"
    worker = start_worker(env, log, "--engine", "faust", "--idle-exit", "6")
    try:
        wait_for_log(log, "outputs not delivered; retrying", timeout_s=60)
        time.sleep(10)
        assert worker.poll() is None, log.read_text()[-3000:]
        create_topic(kafka_bootstrap, topics.prefix + "travel", PARTITIONS)
        assert worker.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()

    # Then nothing was lost
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)
