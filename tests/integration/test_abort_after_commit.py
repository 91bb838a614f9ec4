"""An abort right after a commit, on a real broker: the unit the engine opens as soon as it has
committed is aborted when its partitions are lost (a session timed out over a broker freeze, a
zombie waking up). The coordinator is still writing the last commit's markers then and answers
the new unit's `AddPartitionsToTxn` with CONCURRENT_TRANSACTIONS; librdkafka sends `EndTxn(abort)`
anyway, the coordinator finds no transaction in progress and answers INVALID_TXN_STATE, which
librdkafka makes fatal (librdkafka#4849). The soak run's 15 s broker freeze ended both workers so.

The engine's `Transactional` with real clients: each round commits a unit of records spread over
many partitions, then opens the next and aborts it at once. No round may end the producer, and a
read_committed reader sees exactly the committed units.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.toolkit import read_outputs
from tests.support.kafka import Broker, TopicSet
from worker.config import load_settings
from worker.engines.confluent import Batch, Transactional, _UnitIds
from worker.pipeline import Outcome
from worker.records import Outgoing, Record

pytestmark = pytest.mark.integration

PARTITIONS = 12  # many partitions per unit: writing its markers takes the coordinator a while
ROUNDS = 15
PER_UNIT = 24


def _batch(topics: TopicSet, output: str, first_offset: int) -> Batch:
    records = [
        Record(
            b"{}",
            key=f"{first_offset + i}".encode(),
            topic=topics.input,
            partition=i % PARTITIONS,
            offset=first_offset + i,
        )
        for i in range(PER_UNIT)
    ]
    outgoing = [Outgoing(output, r.value, r.key, [], "routed", r, "banking") for r in records]
    return Batch(records, Outcome(outgoing, 0.0))


def test_aborting_the_unit_opened_right_after_a_commit_is_not_fatal(broker: Broker, tiny_bundle: Path) -> None:
    if broker.kind == "tansu":
        pytest.skip("the embedded Tansu broker has no transaction coordinator of Kafka's kind")
    topics = TopicSet.fresh()
    output = topics.prefix + "banking"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in (topics.input, output)]).values():
        f.result(30)
    settings = load_settings(
        kafka={"bootstrap_servers": broker.bootstrap, "group_id": topics.group, "instance_id": "abort-after-commit"},
        model={"path": tiny_bundle},
        metrics={"enabled": False},
    )
    producer = Producer(settings.librdkafka_producer())
    consumer = Consumer(settings.librdkafka_consumer())
    producer.init_transactions(30)
    tx = Transactional(producer, consumer, settings, _UnitIds("abort-after-commit"))
    committed: set[bytes] = set()
    try:
        for n in range(ROUNDS):
            # Given a unit committed over many partitions
            kept = _batch(topics, output, 2 * n * PER_UNIT)
            tx.add(kept)
            assert tx.commit(final=False) is not None
            committed |= {r.key for r in kept.records if r.key}
            # When the next unit is opened and aborted at once (its partitions lost)
            tx.add(_batch(topics, output, (2 * n + 1) * PER_UNIT))
            # Then the abort completes: no FatalDeliveryError, the producer goes on
            tx.abort()
    finally:
        consumer.close()
        producer.flush(10)
    # And a read_committed reader sees the committed units only, each record once
    received = read_outputs(broker.bootstrap, [output], expect=len(committed), timeout_s=60, quiet_s=3)
    keys = [r.key for r in received]
    assert sorted(keys) == sorted(committed), f"{len(keys)} read, {len(committed)} committed"
