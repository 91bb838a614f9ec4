"""The Faust engine's own guarantees on a real broker, judged from outside (a read_committed
reader over every output): it reads only committed input, loses nothing when a send fails, and
keeps a header's null value null."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from devkit.toolkit import read_outputs, start_worker
from tests.support import scenario
from tests.support.kafka import TopicSet, create_topic

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
