"""The confluent engine's delivery and rewind decisions with fake clients: what a transaction
spans, what at-least-once may commit, where a failed unit rewinds to, and liveness while the
worker waits for a broker. The engine against a real broker is in tests/integration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from tests.support.txn_fake import TxnProducer
from worker.config import Settings, load_settings
from worker.engines.confluent import (
    AtLeastOnce,
    Batch,
    ConfluentEngine,
    Sender,
    Transactional,
    _UnitIds,
)
from worker.errors import DeliveryError, FatalDeliveryError
from worker.housekeeping import Housekeeping
from worker.observability import Health, Hooks, PrometheusHooks
from worker.pipeline import Outcome, build_pipeline
from worker.records import Outgoing, Record

TOPIC = "in"


def _settings(tiny_bundle: Path, **commit: int) -> Settings:
    # nothing listens on port 1: the real clients are built but never reach a broker
    return load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1", "instance_id": "unit"},
        model={"path": tiny_bundle},
        commit=commit or {"interval_ms": 100},
        metrics={"enabled": False},
    )


def _batch(partition: int, *offsets: int) -> Batch:
    records = [Record(b"{}", topic=TOPIC, partition=partition, offset=o) for o in offsets]
    outgoing = [Outgoing("out", r.value, r.key, [], "routed", r, "banking") for r in records]
    return Batch(records, Outcome(outgoing, 0.0))


class FakeProducer:
    """Records transactional calls; `fail_commit` makes commit_transaction raise an abortable error."""

    def __init__(self, fail_commit: bool = False) -> None:
        self.calls: list[str] = []
        self.sent_offsets: list[tuple[str, int, int]] = []
        self.fail_commit = fail_commit
        self.abort_timeouts = 0
        self.pending: list[Callable[[KafkaError | None, Any], None]] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, **kw: Any) -> None:
        self.calls.append("produce")
        if kw.get("on_delivery"):
            self.pending.append(kw["on_delivery"])

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], _group: object, _timeout: float) -> None:
        self.sent_offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def commit_transaction(self, _timeout: float) -> None:
        if self.fail_commit:
            raise KafkaException(KafkaError(KafkaError._FAIL, "broker went away", txn_requires_abort=True))
        self.calls.append("commit")

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append("abort")
        if self.abort_timeouts:
            self.abort_timeouts -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        return 0

    def ack(self, n: int, err: KafkaError | None = None) -> None:
        for cb in self.pending[:n]:
            cb(err, None)
        del self.pending[:n]


class FakeConsumer:
    """Owns partitions 0 and 1; `committed()` always fails (a broker that cannot answer)."""

    def __init__(self) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[list[tuple[str, int, int]]] = []
        self.paused: list[list[tuple[str, int]]] = []
        self.resumed: list[list[tuple[str, int]]] = []

    def consumer_group_metadata(self) -> object:
        return object()

    def committed(self, *_a: object, **_kw: object) -> list[TopicPartition]:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "committed offsets unavailable"))

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def close(self) -> None: ...

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.append([(tp.topic, tp.partition) for tp in tps])

    def resume(self, tps: list[TopicPartition]) -> None:
        self.resumed.append([(tp.topic, tp.partition) for tp in tps])


def test_one_transaction_spans_the_micro_batches_of_an_interval(tiny_bundle: Path) -> None:
    # Given a transactional delivery with a 60 s interval and a 5-message cap
    producer, consumer = FakeProducer(), FakeConsumer()
    tx = Transactional(producer, consumer, _settings(tiny_bundle, interval_ms=60_000, max_items=5), _UnitIds("u"))  # type: ignore[arg-type]
    # When two micro-batches (4 messages) are added, then a third (6 in all)
    tx.add(_batch(0, 10, 11))
    tx.add(_batch(1, 7, 8))
    assert not tx.due(time.monotonic()), "due before the interval or the cap"
    tx.add(_batch(0, 12, 13))
    # Then one transaction holds all three, is due at the cap, and commits every partition's next offset
    assert tx.due(time.monotonic())
    done = tx.commit(final=False)
    assert done is not None and len(done.batches) == 3
    assert producer.calls.count("begin") == 1 and producer.calls.count("commit") == 1
    assert producer.sent_offsets == [(TOPIC, 0, 14), (TOPIC, 1, 9)]
    assert {b.unit for b in done.batches} == {done.unit}, "every output of the transaction names it"


def test_at_least_once_commits_only_the_acknowledged_prefix_in_order(tiny_bundle: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    alo = AtLeastOnce(producer, consumer, _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    alo.add(_batch(0, 0, 1))  # A
    alo.add(_batch(0, 2, 3))  # B
    alo.add(_batch(1, 0))  # C
    # When A is acknowledged but B is not (C is: its partition still waits behind B)
    producer.ack(2)
    callbacks_b = producer.pending[:2]
    producer.pending = producer.pending[2:]
    producer.ack(1)
    done = alo.commit(final=False)
    # Then only A's offsets are committed
    assert done is not None and len(done.batches) == 1
    assert consumer.commits == [[(TOPIC, 0, 2)]]
    # And once B is acknowledged, B and C follow
    for cb in callbacks_b:
        cb(None, None)
    done = alo.commit(final=False)
    assert done is not None and len(done.batches) == 2
    assert consumer.commits[-1] == [(TOPIC, 0, 4), (TOPIC, 1, 1)]


def test_at_least_once_delivery_failure_is_raised_at_the_commit(tiny_bundle: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    alo = AtLeastOnce(producer, consumer, _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    alo.add(_batch(0, 0, 1))
    producer.ack(2, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
    with pytest.raises(DeliveryError, match="too large"):
        alo.commit(final=False)
    assert consumer.commits == [], "nothing committed past an undelivered output"


class CoordinatorAwayConsumer(FakeConsumer):
    """Its offset commits fail as they do while the group coordinator moves or reloads (the
    broker just restarted): `NOT_COORDINATOR`, `failures` times, then succeed."""

    def __init__(self, failures: int, code: int = KafkaError.NOT_COORDINATOR) -> None:
        super().__init__()
        self.failures, self.code = failures, code

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(self.code, "Commit failed: Broker: Not coordinator"))
        super().commit(offsets, asynchronous)


def test_at_least_once_keeps_acknowledged_batches_while_the_coordinator_is_away(tiny_bundle: Path) -> None:
    # Given two acknowledged batches and a group coordinator that is not there yet (chaos run:
    # 576 acknowledged messages rewound on one such error after the broker restarted, all re-delivered)
    producer, consumer = FakeProducer(), CoordinatorAwayConsumer(failures=2)
    alo = AtLeastOnce(producer, consumer, _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    alo.add(_batch(0, 0, 1))
    alo.add(_batch(1, 0))
    producer.ack(3)
    # When the commit fails twice, then succeeds
    assert alo.commit(final=False) is None
    assert alo.commit(final=False) is None
    # Then nothing was dropped for a rewind: the same batches commit once the coordinator answers
    assert len(alo.held()) == 2
    done = alo.commit(final=False)
    assert done is not None and len(done.batches) == 2
    assert consumer.commits == [[(TOPIC, 0, 2), (TOPIC, 1, 1)]]
    # But a final commit (partitions revoked, or stopping) that fails is not deferred
    alo.add(_batch(0, 2))
    producer.ack(1)
    consumer.failures = 1
    with pytest.raises(DeliveryError, match="offset commit failed"):
        alo.commit(final=True)


def test_at_least_once_rewinds_when_the_group_generation_is_gone(tiny_bundle: Path) -> None:
    producer, consumer = FakeProducer(), CoordinatorAwayConsumer(failures=1, code=KafkaError.ILLEGAL_GENERATION)
    alo = AtLeastOnce(producer, consumer, _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    alo.add(_batch(0, 0, 1))
    producer.ack(2)
    with pytest.raises(DeliveryError, match="offset commit failed"):
        alo.commit(final=False)


def test_an_abort_that_timed_out_is_called_again_before_the_next_transaction(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an abort that times out for longer than one abort call retries
    monkeypatch.setattr("worker.engines.confluent.CALL_TIMEOUT_S", 0.0)
    producer = FakeProducer()
    producer.abort_timeouts = 1
    tx = Transactional(producer, FakeConsumer(), _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    tx.add(_batch(0, 1))
    tx.abort()
    # When the next micro-batch arrives
    tx.add(_batch(0, 1))
    # Then the abort is finished first (librdkafka refuses every other call until it is)
    assert producer.calls == ["begin", "produce", "abort", "abort", "begin", "produce"]


@pytest.fixture
def engine(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> ConfluentEngine:
    monkeypatch.setattr("worker.engines.confluent.check_access", lambda _settings: None)  # no broker to ask
    settings = _settings(tiny_bundle, interval_ms=60_000)
    e = ConfluentEngine(settings, build_pipeline(settings), Hooks())
    e.consumer.close()
    return e


def _failing_transaction(engine: ConfluentEngine) -> tuple[FakeProducer, FakeConsumer]:
    """Fake clients whose commit fails, on partitions 0 and 1 of TOPIC."""
    producer, consumer = FakeProducer(fail_commit=True), FakeConsumer()
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    engine.delivery = Transactional(producer, consumer, engine.settings, _UnitIds("u"))  # type: ignore[arg-type]
    engine._assigned = {(TOPIC, 0), (TOPIC, 1)}
    return producer, consumer


def test_failed_transaction_rewinds_to_its_own_first_offsets_without_asking_the_broker(
    engine: ConfluentEngine,
) -> None:
    # Given a transaction of two micro-batches whose commit fails, on a consumer whose
    # committed() raises (the fallback used to seek to the partition's beginning)
    producer, consumer = _failing_transaction(engine)
    engine.delivery.add(_batch(0, 40, 41, 42))
    engine.delivery.add(_batch(1, 7, 8))
    engine.delivery.add(_batch(0, 43))

    # When the engine commits
    with pytest.raises(DeliveryError) as failed:
        engine._commit_if(True)
    engine._fail(failed.value)

    # Then the transaction is aborted and each partition rewinds to the transaction's first offset
    assert producer.calls[-1] == "abort"
    assert sorted(consumer.seeks) == [(TOPIC, 0, 40), (TOPIC, 1, 7)]
    assert engine.processed == 0 and not engine.delivery.held()


def test_rewind_inside_a_rebalance_callback_waits_for_the_poll_and_skips_revoked_partitions(
    engine: ConfluentEngine,
) -> None:
    _producer, consumer = _failing_transaction(engine)
    engine.delivery.add(_batch(0, 5, 6))
    engine.delivery.add(_batch(1, 9))
    # When partition 1 is revoked and finishing the transaction fails
    engine._on_revoke(consumer, [TopicPartition(TOPIC, 1)])  # type: ignore[arg-type]
    # Then nothing is sought inside the callback; the kept partition rewinds once the poll returns
    assert consumer.seeks == []
    engine._rewind([])
    assert consumer.seeks == [(TOPIC, 0, 5)]


def test_health_stays_alive_while_waiting_for_a_broker_that_is_down(
    engine: ConfluentEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a liveness window far shorter than the back-off (0.5 + 1 + 2 s)
    monkeypatch.setattr(Health, "STALE_AFTER_S", 0.3)
    health = Health()
    engine.hooks = health
    attempts: list[float] = []

    def broker_down() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "connection refused"))

    # When the engine waits for it while a probe asks /healthz's question every 50 ms
    probes: list[bool] = []
    stop = threading.Event()
    prober = threading.Thread(
        target=lambda: [probes.append(health.alive()) for _ in iter(lambda: stop.wait(0.05), True)]
    )
    prober.start()
    try:
        engine._retry("probe", broker_down)
    finally:
        stop.set()
        prober.join()
    # Then every probe during 3.5 s of waiting found the worker alive
    assert len(attempts) == 4 and attempts[-1] - attempts[0] > 10 * Health.STALE_AFTER_S
    assert len(probes) > 20 and all(probes), f"{probes.count(False)} of {len(probes)} probes saw a stalled loop"


# -- issue 25, defect 1: a commit that timed out is resumed, never aborted ----------------------


def _txn_settings(tiny_bundle: Path) -> Settings:
    """A 1 s transaction timeout: the window in which a timed-out commit is resumed."""
    return load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1", "instance_id": "unit", "transaction_timeout_ms": 1000},
        model={"path": tiny_bundle},
        metrics={"enabled": False},
    )


def test_a_commit_that_timed_out_is_resumed_not_aborted(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given calls that time out after 0.2 s, and a broker that stops answering for two commit attempts
    monkeypatch.setattr("worker.engines.confluent.CALL_TIMEOUT_S", 0.2)
    producer = TxnProducer(frozen_commits=2)
    ticks: list[float] = []
    tx = Transactional(producer, FakeConsumer(), _txn_settings(tiny_bundle), _UnitIds("u"), lambda: ticks.append(1))  # type: ignore[arg-type]
    tx.add(_batch(0, 5, 6))
    # When the unit is committed
    done = tx.commit(final=False)
    # Then the commit was called again until it completed: no abort (librdkafka would refuse it)
    assert done is not None and len(done.batches) == 1
    assert producer.calls == ["begin", "produce", "produce", "commit", "commit", "commit"], producer.calls
    assert len(producer.committed) == 2 and producer.committed_offsets == [(TOPIC, 0, 7)]
    assert len(ticks) >= 3, "liveness stamped before each attempt"
    # And the next transaction starts normally
    tx.add(_batch(0, 7))
    assert producer.calls[-2:] == ["begin", "produce"]


def test_a_commit_that_cannot_complete_within_the_transaction_timeout_is_fatal(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker frozen for longer than the transaction timeout (1 s)
    monkeypatch.setattr("worker.engines.confluent.CALL_TIMEOUT_S", 0.2)
    producer = TxnProducer(frozen_commits=1000)
    tx = Transactional(producer, FakeConsumer(), _txn_settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    tx.add(_batch(0, 1))
    started = time.monotonic()
    # Then the commit ends in FatalDeliveryError (exit non-zero), not in an abort-retry loop
    with pytest.raises(FatalDeliveryError, match="not completed within"):
        tx.commit(final=False)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert "abort" not in producer.calls


def test_an_abortable_commit_error_aborts_and_an_unfinishable_abort_is_fatal(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.engines.confluent.CALL_TIMEOUT_S", 0.2)
    # Given a commit that fails with an error that requires an abort
    producer = TxnProducer()
    producer.refuse_topics["out"] = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")
    tx = Transactional(producer, FakeConsumer(), _txn_settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    tx.add(_batch(0, 1))
    with pytest.raises(DeliveryError) as failed:
        tx.commit(final=False)
    assert not isinstance(failed.value, FatalDeliveryError)
    # When the abort itself times out and the broker stays away past the window
    producer.frozen_aborts = 1000
    # Then the abort is resumed (never left pending, to fail every later call) and finally fatal
    with pytest.raises(FatalDeliveryError, match="not completed within"):
        tx.abort()
    assert set(producer.calls[producer.calls.index("abort") :]) == {"abort"}


def test_engine_exits_non_zero_when_a_commit_cannot_complete(
    engine: ConfluentEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the engine holding a unit whose commit keeps timing out past the transaction timeout
    monkeypatch.setattr("worker.engines.confluent.CALL_TIMEOUT_S", 0.2)
    producer, consumer = TxnProducer(frozen_commits=1000), FakeConsumer()
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    engine.delivery = Transactional(producer, consumer, _txn_settings(engine.settings.model.path), _UnitIds("u"))  # type: ignore[arg-type]
    engine._assigned = {(TOPIC, 0)}
    engine.delivery.add(_batch(0, 3, 4))
    # When the engine commits, fails, and handles the failure
    with pytest.raises(DeliveryError) as failed:
        engine._commit_if(True)
    engine._fail(failed.value)
    # Then it stops with a fatal error (run raises it: exit 1) instead of aborting and rewinding
    assert engine._should_stop() and engine._fatal is not None
    assert "abort" not in producer.calls and consumer.seeks == []


# -- issue 25, defect 2: a record Kafka refuses is dead-lettered, never retried forever ---------


def _big_batch(partition: int, offset: int, value_bytes: int) -> Batch:
    record = Record(b"v" * value_bytes, b"key", [("trace", b"t")], TOPIC, partition, offset)
    small = Record(b"{}", b"k2", [], TOPIC, partition, offset + 1)
    outgoing = [Outgoing("out", r.value, r.key, list(r.headers), "routed", r, "banking") for r in (record, small)]
    return Batch([record, small], Outcome(outgoing, 0.0))


def test_a_record_the_producer_refuses_is_dead_lettered_without_its_body_in_the_same_transaction(
    tiny_bundle: Path,
) -> None:
    # Given a producer whose message.max.bytes is 1,000 and a routed output of 2,000 bytes
    producer = TxnProducer(max_bytes=1000)
    tx = Transactional(producer, FakeConsumer(), _txn_settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    batch = _big_batch(0, 10, 2000)
    # When the batch is added and committed
    tx.add(batch)
    done = tx.commit(final=False)
    # Then the refused output became a body-less dead letter; nothing was aborted
    assert done is not None and "abort" not in producer.calls
    (dl_topic, dl_key, dl_value, dl_headers), (routed_topic, *_) = producer.committed
    headers = dict(dl_headers)
    assert (dl_topic, dl_key, dl_value, routed_topic) == ("classify.dlq", b"key", None, "out")
    assert headers["error.reason"] == b"too_large" and headers["error.value_bytes"] == b"2000"
    assert [o.kind for o in batch.outcome.outgoing] == ["dead_letter", "routed"], "metrics count what was written"


def test_a_record_the_broker_refuses_is_dead_lettered_after_one_rewind(engine: ConfluentEngine) -> None:
    # Given an output topic whose broker refuses the record (its max.message.bytes is smaller)
    producer, consumer = TxnProducer(), FakeConsumer()
    producer.refuse_topics["out"] = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    sender = Sender(producer, "dlq", lambda: 10_000)  # type: ignore[arg-type]
    engine.delivery = Transactional(producer, consumer, engine.settings, _UnitIds("u"), sender=sender)  # type: ignore[arg-type]
    engine._assigned = {(TOPIC, 0)}
    engine.delivery.add(_batch(0, 4))
    # When the commit fails (the delivery report names the refusal) and the batch is processed again
    with pytest.raises(DeliveryError) as failed:
        engine._commit_if(True)
    engine._fail(failed.value)
    assert consumer.seeks == [(TOPIC, 0, 4)]
    engine.delivery.add(_batch(0, 4))
    engine._commit_if(True)
    # Then the second attempt dead-letters it and commits: one rewind, not a loop
    assert [(t, v) for t, _k, v, _h in producer.committed] == [("dlq", None)]
    assert producer.committed_offsets == [(TOPIC, 0, 5)] and engine.processed == 1


def test_at_least_once_dead_letters_a_record_the_broker_refused(tiny_bundle: Path) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    alo = AtLeastOnce(producer, consumer, _settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    alo.add(_batch(0, 0, 1))
    producer.ack(2, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"))
    with pytest.raises(DeliveryError):
        alo.commit(final=False)
    alo.abort()
    # When the rewound batch comes back, its outputs go to the dead-letter topic instead
    batch = _batch(0, 0, 1)
    alo.add(batch)
    assert [o.topic for o in batch.outcome.outgoing] == ["classify.dlq", "classify.dlq"]
    producer.ack(2)
    done = alo.commit(final=False)
    assert done is not None and consumer.commits == [[(TOPIC, 0, 2)]]


def test_a_failed_seek_after_an_abort_is_fatal(engine: ConfluentEngine) -> None:
    # Given a consumer that cannot seek (the rewound records would otherwise be skipped: lost)
    _producer, consumer = _failing_transaction(engine)

    def no_seek(tp: TopicPartition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))

    consumer.seek = no_seek  # type: ignore[method-assign]
    engine.delivery.add(_batch(0, 40, 41))
    with pytest.raises(DeliveryError) as failed:
        engine._commit_if(True)
    # When the engine aborts and rewinds
    engine._fail(failed.value)
    # Then it stops with a fatal error (run raises it: exit 1), instead of reading on
    assert engine._should_stop() and engine._fatal is not None and "seek failed" in engine._fatal.str()


# -- issue 25, defect 4: memory bounded by bytes ------------------------------------------------


def _bytes_settings(tiny_bundle: Path) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1", "instance_id": "unit"},
        model={"path": tiny_bundle},
        commit={"interval_ms": 60_000, "max_items": 1000},
        limits={"max_held_bytes": 10_000},
        metrics={"enabled": False},
    )


def _sized_batch(partition: int, offset: int, value_bytes: int) -> Batch:
    r = Record(b"v" * value_bytes, None, [], TOPIC, partition, offset)
    return Batch([r], Outcome([Outgoing("out", b"{}", None, [], "routed", r, "banking")], 0.0))


def test_an_exactly_once_unit_commits_early_at_the_byte_cap(tiny_bundle: Path) -> None:
    tx = Transactional(TxnProducer(), FakeConsumer(), _bytes_settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    tx.add(_sized_batch(0, 0, 6_000))
    assert not tx.due(time.monotonic()), "under the cap, the interval (60 s) decides"
    tx.add(_sized_batch(0, 1, 6_000))
    assert tx.due(time.monotonic()), "12,000 held bytes: over the 10,000-byte cap"
    assert tx.commit(final=False) is not None and not tx.due(time.monotonic())


def test_at_least_once_pauses_consuming_while_unacknowledged_bytes_exceed_the_cap(engine: ConfluentEngine) -> None:
    # Given at-least-once with a 10,000-byte cap and 12,000 bytes whose outputs are not acknowledged
    producer, consumer = FakeProducer(), FakeConsumer()
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    settings = _bytes_settings(engine.settings.model.path)  # type: ignore[arg-type]
    engine.delivery = AtLeastOnce(producer, consumer, settings, _UnitIds("u"))  # type: ignore[arg-type]
    engine.delivery.add(_sized_batch(0, 0, 6_000))
    engine._throttle()
    assert consumer.paused == [], "under the cap: consuming goes on"
    engine.delivery.add(_sized_batch(0, 1, 6_000))
    # When the loop turns, then the assigned partitions are paused
    engine._throttle()
    assert consumer.paused == [[(TOPIC, 0), (TOPIC, 1)]]
    # And once the outputs are acknowledged and committed, consuming resumes
    producer.ack(2)
    engine.delivery.commit(final=False)
    engine._throttle()
    assert consumer.resumed == [[(TOPIC, 0), (TOPIC, 1)]]


def test_a_full_producer_queue_stamps_liveness_and_gives_up_when_stopping() -> None:
    # Given a producer whose local queue stays full (a broker that does not acknowledge)
    class FullQueue(FakeProducer):
        def produce(self, topic: str, **kw: Any) -> None:
            raise BufferError("Local: Queue full")

    ticks: list[int] = []
    sender = Sender(FullQueue(), "dlq", lambda: 10_000, lambda: ticks.append(1), lambda: len(ticks) >= 5)  # type: ignore[arg-type]
    # When a batch is sent, then liveness is stamped while waiting, and a stop request ends the wait
    with pytest.raises(DeliveryError, match="queue was full"):
        sender.send(_batch(0, 1), "u:1", lambda _out: None)
    assert len(ticks) == 5


# -- issue 25, defect 8: metrics ------------------------------------------------------------------


def _sample(hooks: PrometheusHooks, name: str, labels: dict[str, str] | None = None) -> float | None:
    return hooks.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]


def _prometheus(engine: ConfluentEngine) -> PrometheusHooks:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    hooks.registry = registry  # type: ignore[attr-defined]
    engine.hooks = hooks
    return hooks


def test_lost_partitions_are_not_counted_as_delivery_failures(engine: ConfluentEngine) -> None:
    hooks = _prometheus(engine)
    _producer, consumer = _failing_transaction(engine)
    engine.delivery.add(_batch(0, 5, 6))
    engine._on_lost(consumer, [TopicPartition(TOPIC, 0)])  # type: ignore[arg-type]
    assert not engine.delivery.held(), "the unit was abandoned"
    assert not _sample(hooks, "classify_batch_failures_total", {"stage": "delivery"})  # None, or 0 once pre-labelled


def test_partitions_lost_right_after_a_commit_abort_without_a_fatal_error(engine: ConfluentEngine) -> None:
    # Given a broker just back from a freeze, slow to write the last commit's markers: the next
    # transaction's partitions are still being registered (soak run: both workers exited 1 with
    # INVALID_TXN_STATE here, 330 ms after `partitions lost`)
    producer, consumer = TxnProducer(), FakeConsumer()
    producer.slow_markers = True
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    engine.delivery = Transactional(producer, consumer, engine.settings, _UnitIds("u"))  # type: ignore[arg-type]
    engine._assigned = {(TOPIC, 0), (TOPIC, 1)}
    engine.delivery.add(_batch(0, 1))
    assert engine._commit_if(True)
    engine.delivery.add(_batch(0, 2, 3))
    # When the consumer finds its session timed out and its partitions lost
    engine._on_lost(consumer, [TopicPartition(TOPIC, 0)])  # type: ignore[arg-type]
    # Then the open transaction was drained (its partitions registered) and aborted; the worker goes on
    assert engine._fatal is None, engine._fatal
    assert producer.calls[-2:] == ["flush", "abort"], producer.calls
    assert not engine.delivery.held() and not producer.open
    assert producer.committed_offsets == [(TOPIC, 0, 2)], "only the first unit committed"


def test_an_abort_on_a_fatally_failed_producer_is_fatal_not_a_crash(tiny_bundle: Path) -> None:
    class Fenced(TxnProducer):
        def flush(self, _timeout: float = 0) -> int:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced by a newer producer", fatal=True))

    tx = Transactional(Fenced(), FakeConsumer(), _txn_settings(tiny_bundle), _UnitIds("u"))  # type: ignore[arg-type]
    tx.add(_batch(0, 1))
    with pytest.raises(FatalDeliveryError, match="fenced"):
        tx.abort()


def test_a_commit_is_timed(engine: ConfluentEngine) -> None:
    hooks = _prometheus(engine)
    producer, consumer = FakeProducer(), FakeConsumer()
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    engine.delivery = Transactional(producer, consumer, engine.settings, _UnitIds("u"))  # type: ignore[arg-type]
    engine.delivery.add(_batch(0, 1))
    assert engine._commit_if(True)
    assert _sample(hooks, "classify_commit_seconds_count") == 1.0


class _Done:
    def __init__(self, value: object) -> None:
        self.value = value

    def result(self, *_a: object) -> object:
        return self.value


class FakeAdmin:
    """Partition 1's log starts at 100 (retention deleted the first 100 records). No
    `list_consumer_group_offsets`: librdkafka 2.16's admin client crashes on its answer when the
    coordinator moves (SIGSEGV), so lag must not ask it."""

    def list_offsets(self, specs: dict[TopicPartition, Any], **_kw: object) -> dict[TopicPartition, _Done]:
        earliest = "earliest" in repr(next(iter(specs.values()))).lower()
        at = {0: 0, 1: 100} if earliest else {0: 50, 1: 130}
        return {tp: _Done(type("O", (), {"offset": at[tp.partition]})()) for tp in specs}


class GroupOffsets:
    """The group's committed offsets: partition 0 at 40, partition 1 none yet."""

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        at = {0: 40, 1: -1001}
        return [TopicPartition(tp.topic, tp.partition, at[tp.partition]) for tp in tps]


def test_lag_counts_from_the_log_start_where_nothing_is_committed(tiny_bundle: Path) -> None:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    settings = _settings(tiny_bundle)
    hooks.on_assign([(TOPIC, 0), (TOPIC, 1)])
    house = Housekeeping(settings, build_pipeline(settings).router, hooks, lambda: {(TOPIC, 0), (TOPIC, 1)})
    house.admin = FakeAdmin()  # type: ignore[assignment]
    house.offsets = GroupOffsets()  # type: ignore[assignment]
    house.report_lag()
    lag = {p: registry.get_sample_value("classify_consumer_lag", {"topic": TOPIC, "partition": p}) for p in "01"}
    assert lag == {"0": 10.0, "1": 30.0}, "partition 1: 130 - 100 (log start), not 130 - 0"


def test_a_lag_report_after_a_revoke_does_not_bring_the_gauge_back() -> None:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    hooks.on_assign([(TOPIC, 0)])
    hooks.on_lag(TOPIC, 0, 5)
    hooks.on_revoke([(TOPIC, 0)])
    hooks.on_lag(TOPIC, 0, 5)  # computed by housekeeping before the revoke, reported after
    assert registry.get_sample_value("classify_consumer_lag", {"topic": TOPIC, "partition": "0"}) is None


def test_unit_ids_differ_between_processes_with_the_same_pid() -> None:
    # Given two processes of one replica that both run as PID 1 (a container restarted in place),
    # modelled as two id sources in this one process (same PID)
    first, second = _UnitIds("w1"), _UnitIds("w1")
    # Then their unit ids never repeat: the `route.batch` header names one attempt
    assert first.next() != second.next()


# -- issue 25: never stuck while looking healthy ------------------------------------------------


class LoopConsumer(FakeConsumer):
    """Partition 0 holds offsets 0..4; `seek` rewinds the read position, as librdkafka's does."""

    def __init__(self) -> None:
        super().__init__()
        self.position = 0

    def poll(self, timeout: float) -> Message | None:
        if self.position >= 5:
            time.sleep(min(timeout, 0.01))
            return None
        self.position += 1
        return Message(topic=TOPIC, partition=0, offset=self.position - 1, value=b'{"text": "rain"}')

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out = []
        while len(out) < num_messages and (m := self.poll(0)) is not None:
            out.append(m)
        return out

    def seek(self, tp: TopicPartition) -> None:
        super().seek(tp)
        self.position = tp.offset


def test_a_worker_retrying_a_batch_that_never_commits_stops_looking_healthy(
    engine: ConfluentEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given commits that always fail (abort, rewind, back off, again) and a 1.5 s stuck threshold
    monkeypatch.setattr("worker.engines.confluent.PROGRESS_STUCK_S", 1.5)
    health = Health()
    engine.hooks = health
    producer, consumer = TxnProducer(), LoopConsumer()
    producer.abortable_commits = 1_000
    engine.consumer, engine.producer = consumer, producer  # type: ignore[assignment]
    engine.delivery = Transactional(producer, consumer, engine.settings, _UnitIds("u"), engine._alive)  # type: ignore[arg-type]
    engine._assigned = {(TOPIC, 0)}
    engine._assigned_at = time.monotonic()
    engine.delivery._interval_s = 0.001  # type: ignore[attr-defined]
    # When the loop runs for 4 s while a probe asks /healthz's question
    seen: list[tuple[float, bool]] = []
    runner = threading.Thread(target=engine._loop, args=(None, None))
    started = time.monotonic()
    runner.start()
    while time.monotonic() - started < 4.0:
        seen.append((time.monotonic() - started, health.alive()))
        time.sleep(0.05)
    engine.request_stop()
    runner.join(10)
    # Then it looked healthy at first, and unhealthy once 1.5 s had passed without a commit
    assert len(consumer.seeks) >= 2, "the batch was retried"
    assert all(ok for t, ok in seen if t < 1.0)
    assert not any(ok for t, ok in seen if t > 2.0), [t for t, ok in seen if ok and t > 2.0][:5]
