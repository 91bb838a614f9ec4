"""The main loop on confluent-kafka: poll a batch, run the pure pipeline, deliver, commit.

Exactly-once (default) follows librdkafka's `examples/transactions.c`: one transaction per batch
(produce every output → `send_offsets_to_transaction` → commit); an abortable error aborts and
rewinds the consumer to the committed offsets so the batch is processed again; a fatal error
(fenced by a newer replica with our transactional id) ends the process non-zero so the
orchestrator restarts it. Processing is synchronous within the poll loop, so no transaction is
ever open while rebalance callbacks run: revoked or lost partitions never leave one behind.

At-least-once: an idempotent producer, and offsets committed only after every output of the
batch is acknowledged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from worker.config import Settings
from worker.errors import DeliveryError, FatalDeliveryError, InferenceError
from worker.kafka_errors import ClientLog, KafkaAccessError, Resources, Side, check_access, explain, kafka_error_of
from worker.messages import BATCH_HEADER
from worker.observability import Hooks
from worker.pipeline import Outcome, Pipeline
from worker.records import Headers, Outgoing, Record
from worker.topics import admin_client, ensure_topics, missing_topics, required_topics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bounds for waiting on a broker that is down or a classifier that fails: quick first retry,
#: then no more than one attempt every 30 s.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: Per-call timeout for transactional and flush calls; longer than a healthy round trip by far.
CALL_TIMEOUT_S = 30.0
#: How often the output topics are checked for existence (a deleted one is recreated).
TOPIC_CHECK_INTERVAL_S = 10.0
#: How often lag is computed from watermarks and committed offsets.
LAG_INTERVAL_S = 5.0
#: Longest block waiting for the first message of a batch: bounds how late housekeeping and a
#: stop request are noticed on an idle input topic.
IDLE_POLL_S = 0.1


class Backoff:
    def __init__(self) -> None:
        self.delay_s = BACKOFF_START_S

    def wait(self, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline and not should_stop():
            time.sleep(0.05)
        self.delay_s = min(self.delay_s * 2, BACKOFF_MAX_S)

    def reset(self) -> None:
        self.delay_s = BACKOFF_START_S


def to_record(m: Message) -> Record:
    ts_type, ts = m.timestamp()
    return Record(
        value=m.value(),
        key=m.key(),
        headers=cast(Headers, m.headers() or []),
        topic=m.topic() or "",
        partition=m.partition() or 0,
        offset=m.offset() or 0,
        timestamp_ms=None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
    )


def next_offsets(records: list[Record]) -> list[TopicPartition]:
    """The offsets to commit after a batch: last offset + 1 per partition."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        last[key] = max(last.get(key, -1), r.offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


def _kafka_error(e: KafkaException) -> KafkaError:
    err = e.args[0]
    return err if isinstance(err, KafkaError) else KafkaError(KafkaError._FAIL, str(err))


class ConfluentEngine:
    def __init__(self, settings: Settings, pipeline: Pipeline, hooks: Hooks) -> None:
        check_access(settings)  # before any client connects: a refused login is one line, not every client's
        self.settings = settings
        self.pipeline = pipeline
        self.hooks = hooks
        self.exactly_once = settings.delivery == "exactly_once"
        self._stop = False
        self._fatal: KafkaError | None = None
        #: why the cluster refuses us (credentials, TLS, an ACL): stop, and `run` raises KafkaAccessError
        self._refusal: str | None = None
        self._resources = Resources.of(settings, required_topics(settings, pipeline.router))
        self._committed: dict[tuple[str, int], int] = {}
        self._next_lag = 0.0
        self._next_topic_check = time.monotonic() + TOPIC_CHECK_INTERVAL_S
        self._admin = admin_client(settings)
        self.processed = 0
        #: perf_counter() of the first consumed record and of the last commit: throughput window.
        self.first_record_at: float | None = None
        self.last_commit_at: float | None = None
        # instance + pid: unique across restarts of one replica, so a batch id names one attempt
        self._batch_prefix = f"{settings.kafka.instance_id}:{os.getpid()}:"
        self._batch_seq = 0
        self._client_log = ClientLog()
        self.consumer = Consumer(
            {
                **settings.librdkafka_consumer(),
                "logger": self._client_log,
                "error_cb": lambda err: self._on_error(err, "consumer"),
            }
        )
        self.producer = Producer(
            {
                **settings.librdkafka_producer(),
                "logger": self._client_log,
                "error_cb": lambda err: self._on_error(err, "producer"),
            }
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop finishes or aborts the batch in hand, then exits."""
        self._stop = True

    def _should_stop(self) -> bool:
        return self._stop or self._fatal is not None or self._refusal is not None

    def run(self, max_messages: int | None = None, idle_exit_s: float | None = None) -> None:
        """Run until stopped, `max_messages` are committed, or nothing arrives for `idle_exit_s`.

        Raises `FatalDeliveryError` when the producer is fenced or fatally broken, `KafkaAccessError`
        when the cluster lacks an ACL we need (refused credentials are found in `__init__`)."""
        try:
            if self.settings.topics.auto_create:
                t = self.settings.topics
                names = required_topics(self.settings, self.pipeline.router)
                self._retry("create topics", lambda: ensure_topics(self._admin, names, t.partitions, t.replication))
            if self.exactly_once:
                self._retry("init_transactions", lambda: self.producer.init_transactions(CALL_TIMEOUT_S))
            self.consumer.subscribe(
                [self.settings.topics.input],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._loop(max_messages, idle_exit_s)
        finally:
            self._close()
        if self._refusal is not None:
            raise KafkaAccessError(self._refusal)
        if self._fatal is not None:
            raise FatalDeliveryError(f"fatal Kafka error: {self._fatal.str()}")

    def _loop(self, max_messages: int | None, idle_exit_s: float | None) -> None:
        backoff = Backoff()
        last_message = time.monotonic()
        while not self._should_stop():
            self.hooks.on_loop()
            self._report_lag()
            self._check_topics()
            want = self.settings.batch.max_items
            if max_messages is not None:
                want = min(want, max_messages - self.processed)
            records = self._records(self._take(want))
            if not records:
                if idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                    log.info("idle, exiting", extra={"idle_exit_s": idle_exit_s, "processed": self.processed})
                    return
                continue
            last_message = time.monotonic()
            if self.first_record_at is None:
                self.first_record_at = time.perf_counter()
            if self._process(records):
                self.last_commit_at = time.perf_counter()
                backoff.reset()
                self.processed += len(records)
                if max_messages is not None and self.processed >= max_messages:
                    log.info("max messages reached", extra={"processed": self.processed})
                    return
            else:
                self._rewind(records)
                backoff.wait(self._should_stop)

    def _close(self) -> None:
        try:
            self.consumer.close()  # leaves the group, so the partitions move at once
        except (KafkaException, RuntimeError) as e:
            log.warning("consumer close failed", extra={"error": str(e)})
        try:
            self.producer.flush(5.0)
        except KafkaException as e:  # a fatally failed producer (fenced, refused) raises its error again
            log.warning("producer flush failed", extra={"error": str(e)})

    # -- one batch ---------------------------------------------------------------------------

    def _take(self, want: int) -> list[Message]:
        """A batch as soon as one message is there: the first message, then whatever else is
        already fetched (up to `want`), waiting at most `batch.max_wait_ms` more for it to fill.

        librdkafka's batch consume waits for its full timeout unless `want` messages arrive, so
        a fixed fill wait would be added to every message's latency at low load; this way a
        batch is as large as the backlog that built up while the previous one was processed."""
        first = self.consumer.poll(IDLE_POLL_S)
        if first is None:
            return []
        if want <= 1:
            return [first]
        fill_s = self.settings.batch.max_wait_ms / 1000
        return [first, *self.consumer.consume(num_messages=want - 1, timeout=fill_s)]

    def _records(self, messages: list[Message]) -> list[Record]:
        records = []
        for m in messages:
            err = m.error()
            if err is None:
                records.append(to_record(m))
            elif self._refused(err, "consumer"):
                continue
            elif err.fatal():
                self._fatal = err
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error", extra={"error": err.str(), "code": err.name()})
        return records

    def _process(self, records: list[Record]) -> bool:
        """True when the batch is delivered and committed; False means rewind and retry."""
        try:
            outcome = self.pipeline.process(records)
        except InferenceError as e:
            log.error("classifier failed on a batch; will retry", extra={"error": str(e), "size": len(records)})
            self.hooks.on_batch_failed("inference")
            return False
        self.hooks.on_batch(outcome)
        offsets = next_offsets(records)
        self._batch_seq += 1
        batch = f"{self._batch_prefix}{self._batch_seq}".encode()
        try:
            if self.exactly_once:
                self._transact(outcome, offsets, batch)
            else:
                self._deliver_then_commit(outcome, offsets, batch)
        except FatalDeliveryError as e:
            log.critical("fatal delivery error", extra={"error": str(e), "batch": batch.decode()})
            return False
        except DeliveryError as e:
            log.warning("batch not delivered; rewinding", extra={"error": str(e), "batch": batch.decode()})
            self.hooks.on_batch_failed("delivery")
            self._check_topics(force=True)
            return False
        log.debug("batch committed", extra={"batch": batch.decode(), "messages": len(records)})
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self.hooks.on_committed(outcome.outgoing, int(time.time() * 1000))
        return True

    def _produce(
        self, out: Outgoing, batch: bytes, on_delivery: Callable[[KafkaError | None, Message], None] | None
    ) -> None:
        headers = cast(Any, [*out.headers, (BATCH_HEADER, batch)])
        while True:
            try:
                self.producer.produce(out.topic, value=out.value, key=out.key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve delivery reports, then try again
                self.producer.poll(0.05)

    def _transact(self, outcome: Outcome, offsets: list[TopicPartition], batch: bytes) -> None:
        p = self.producer
        try:
            p.begin_transaction()
            for out in outcome.outgoing:
                self._produce(out, batch, None)
            self._call(
                lambda: p.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), CALL_TIMEOUT_S)
            )
            self._call(lambda: p.commit_transaction(CALL_TIMEOUT_S))
        except KafkaException as e:
            err = _kafka_error(e)
            p.poll(0)  # serves the log lines that name a topic the transaction was refused
            refused = self._refused(err, "producer")
            if err.fatal():
                self._fatal = None if refused else err
                raise FatalDeliveryError(err.str()) from e
            self._abort()
            raise DeliveryError(f"transaction aborted: {err.str()}") from e

    def _call(self, fn: Callable[[], None]) -> None:
        """Retry a transactional call while librdkafka says the same call may succeed."""
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            try:
                fn()
                return
            except KafkaException as e:
                err = _kafka_error(e)
                if not err.retriable() or time.monotonic() > deadline or self._stop:
                    raise
                time.sleep(0.1)

    def _abort(self) -> None:
        try:
            self.producer.abort_transaction(CALL_TIMEOUT_S)
        except KafkaException as e:
            err = _kafka_error(e)
            if err.fatal():
                self._fatal = err
                raise FatalDeliveryError(err.str()) from e
            log.warning("abort failed", extra={"error": err.str()})

    def _deliver_then_commit(self, outcome: Outcome, offsets: list[TopicPartition], batch: bytes) -> None:
        failures: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(err)

        for out in outcome.outgoing:
            self._produce(out, batch, on_delivery)
        remaining = self.producer.flush(CALL_TIMEOUT_S)
        if remaining or failures:
            first = failures[0].str() if failures else "timeout"
            raise DeliveryError(f"{len(failures)} failed, {remaining} unacknowledged outputs ({first})")
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            raise DeliveryError(f"offset commit failed: {_kafka_error(e).str()}") from e

    def _rewind(self, records: list[Record]) -> None:
        """Seek the batch's partitions back to their committed offsets so it is processed again."""
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        mine = [TopicPartition(t, p) for t, p in {(r.topic, r.partition) for r in records} if (t, p) in assigned]
        if not mine:
            return
        try:
            committed = self.consumer.committed(mine, timeout=CALL_TIMEOUT_S)
        except KafkaException as e:
            log.warning("cannot read committed offsets to rewind", extra={"error": str(e)})
            committed = mine
        for tp in committed:
            target = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            try:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, target))
            except KafkaException as e:
                log.warning("seek failed", extra={"partition": tp.partition, "error": str(e)})

    # -- callbacks and housekeeping ---------------------------------------------------------

    def _check_topics(self, force: bool = False) -> None:
        """Every TOPIC_CHECK_INTERVAL_S, and after a failed delivery: an output topic deleted
        under us is recreated (auto_create) or reported each time, never silently skipped."""
        now = time.monotonic()
        if not force and now < self._next_topic_check:
            return
        self._next_topic_check = now + TOPIC_CHECK_INTERVAL_S
        try:
            names = required_topics(self.settings, self.pipeline.router)
            if self.settings.topics.auto_create:
                t = self.settings.topics
                created = ensure_topics(self._admin, names, t.partitions, t.replication)
                if created:
                    log.warning("recreated missing topics", extra={"topics": created})
            elif missing := missing_topics(self._admin, names):
                log.error("output topics missing; create them or set CW_TOPICS__AUTO_CREATE", extra={"topics": missing})
        except (KafkaException, DeliveryError) as e:
            log.warning("cannot check topics", extra={"error": str(e)})

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        backoff = Backoff()
        while not self._should_stop():
            try:
                return fn()
            except DeliveryError as e:  # e.g. a topic we may not create
                err_in = kafka_error_of(e)
                if err_in is not None and self._refused(err_in, "admin"):
                    return None
                raise
            except KafkaException as e:
                err = _kafka_error(e)
                if self._refused(err, "producer"):
                    return None
                if err.fatal():
                    self._fatal = err
                    return None
                log.warning(
                    "waiting for the broker", extra={"call": what, "error": err.str(), "retry_in_s": backoff.delay_s}
                )
                backoff.wait(self._should_stop)
        return None

    def _refused(self, err: KafkaError, side: Side) -> bool:
        """True when waiting cannot fix `err` (see worker.kafka_errors); the first cause is kept
        for the one line `run` raises, and the loop stops."""
        cause = explain(err, self._resources, side, self._client_log.denied_topics)
        if cause is not None and self._refusal is None:
            self._refusal = cause
        return cause is not None

    def _on_error(self, err: KafkaError, side: Side) -> None:
        if self._refused(err, side):
            return
        if err.fatal():
            self._fatal = err
            log.critical("fatal client error", extra={"error": err.str()})
        else:
            log.warning("client error", extra={"error": err.str(), "code": err.name()})

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        self.hooks.on_assign([(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})
        self._forget(partitions)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost", extra={"partitions": [p.partition for p in partitions]})
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._committed.pop((p.topic, p.partition), None)
        self.hooks.on_revoke([(p.topic, p.partition) for p in partitions])

    def _report_lag(self) -> None:
        """Lag from watermarks and committed offsets: librdkafka's own `consumer_lag` goes stale
        when offsets are committed through a transaction."""
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + LAG_INTERVAL_S
        try:
            assigned = self.consumer.assignment()
            unknown = [tp for tp in assigned if (tp.topic, tp.partition) not in self._committed]
            if unknown:
                for tp in self.consumer.committed(unknown, timeout=1.0):
                    self._committed[(tp.topic, tp.partition)] = max(tp.offset, 0)
            for tp in assigned:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                committed = self._committed.get((tp.topic, tp.partition), 0)
                self.hooks.on_lag(tp.topic, tp.partition, max(0, high - committed))
        except KafkaException as e:
            log.debug("lag not available", extra={"error": str(e)})
