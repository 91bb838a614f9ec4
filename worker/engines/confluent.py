"""The main loop on confluent-kafka, pipelined on three threads: the engine thread polls, produces
and owns every consumer call; the classifier thread runs micro-batch N+1 while N is produced
(N+1 is handed over first); the committer thread runs a transaction's commit while the next
batch is classified (librdkafka allows one open transaction per producer, so what is classified
meanwhile waits for the commit before it is produced). Bounded: one batch at the classifier, one
waiting for a commit, and a commit unit's batches. Design and measurements: docs/engines.md.

Exactly-once (default), as Kafka Streams does it under EOS: one transaction spans the
micro-batches in hand; it commits as soon as nothing is in hand (at most every
`CW_COMMIT__MIN_INTERVAL_MS`), at `CW_COMMIT__INTERVAL_MS` under load, early at the unit's size
caps. Any failure (classifier, produce, commit) aborts the whole transaction and seeks back to
the first offsets it held, so its batches are processed again. A fatal error (fenced by a newer
replica with our transactional id) ends the process non-zero. Revoked partitions never leave a
transaction open: `on_revoke` finishes it (or aborts it).

At-least-once: asynchronous produce with an idempotent producer; offsets are committed at the
interval up to the last micro-batch whose outputs were all acknowledged, in order.

Lag and topic checks run on their own thread with their own admin client (`worker.housekeeping`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from worker.batching import BatchSizer
from worker.config import Settings
from worker.errors import DeliveryError, FatalDeliveryError, InferenceError, WedgedClientError
from worker.housekeeping import Housekeeping
from worker.kafka_errors import ClientLog, KafkaAccessError, Resources, Side, check_access, explain, kafka_error_of
from worker.kafka_util import CALL_TIMEOUT_S, RECORD_REFUSALS, Backoff, kafka_error, retry_call
from worker.messages import BATCH_HEADER
from worker.observability import Hooks
from worker.pipeline import (
    RECORD_OVERHEAD_BYTES,
    Outcome,
    Pipeline,
    max_record_bytes,
    refused_stand_in,
)
from worker.records import Headers, Outgoing, Record
from worker.topics import (
    admin_client,
    ensure_topics,
    required_topics,
    smallest_message_limit,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longest single wait of the loop (for a message, or for the classifier): bounds how late a
#: stop request, a due commit and the liveness stamp are noticed.
IDLE_POLL_S = 0.1
#: Longest poll while a commit runs on the committer thread and the classifier is idle: the
#: consumer's poll cannot be woken, so this bounds how late the commit's end is noticed.
COMMIT_POLL_S = 0.002
#: A classifier call running longer than this is stuck: the loop stops stamping liveness, so
#: `/healthz` fails and the orchestrator restarts the pod (a batch takes well under a second).
CLASSIFIER_STUCK_S = 30.0
#: Work in hand (held for a commit, at the classifier, or rewound after a failure) and no commit
#: for this long: the worker is stuck, however busy its retries look. `/healthz` fails at once
#: (`Hooks.on_stalled`) and the orchestrator restarts it. Above what a broker freeze inside the
#: transaction timeout costs a resumed commit (a 30 s call timeout, then the resumed call).
PROGRESS_STUCK_S = 60.0
#: Longest wait for an aborted unit's records to reach their partitions before the abort (see
#: `Transactional.abort`): the coordinator writes a commit's markers in well under a second
#: once it answers again; bounded so a transaction already failed (its records never sent)
#: delays its abort by no more than this.
ABORT_DRAIN_S = 5.0


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


def next_offsets(records: Iterable[Record]) -> list[TopicPartition]:
    """The offsets to commit after these records: last offset + 1 per partition."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        last[key] = max(last.get(key, -1), r.offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


def first_offsets(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """Where to seek to process these records again: their first offset per partition. The
    worker knows it, so a rewind needs no broker round trip and never goes further back."""
    first: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        first[key] = min(first.get(key, r.offset), r.offset)
    return first


@dataclass(slots=True)
class Batch:
    """One classified micro-batch: its inbound records and the pipeline's outcome."""

    records: list[Record]
    outcome: Outcome
    #: Outputs not yet acknowledged (at-least-once), and the first delivery error, latched.
    unacked: int = 0
    error: KafkaError | None = None
    #: The commit unit its outputs carry in the `route.batch` header.
    unit: str = ""
    #: Wall-clock seconds when it was handed to the classifier, came back, and was produced:
    #: with the commit's own start and end, the per-stage latency (`Hooks.on_stages`).
    submitted_at: float = 0.0
    classified_at: float = 0.0
    produced_at: float = 0.0

    @property
    def inbound_bytes(self) -> int:
        """What holding the batch costs, roughly: its inbound values (outputs are about as large)."""
        return sum(len(r.value or b"") for r in self.records)


@dataclass(slots=True)
class Committed:
    """What a commit made durable: the commit unit's id (the `route.batch` header of its
    outputs) and its micro-batches."""

    unit: str
    batches: list[Batch] = field(default_factory=list)


class Delivery(Protocol):
    """How classified micro-batches reach Kafka: one transaction per interval, or acknowledged
    produce + offset commits. The engine owns polling, classifying, rewinds and metrics."""

    def add(self, batch: Batch) -> None:
        """Produce the batch's outputs into the open unit (opening one if needed)."""

    def held(self) -> list[Batch]:
        """Batches added and not yet committed: what a failure must process again."""

    def due(self, now: float) -> bool:
        """The interval (or the unit's size cap) says: commit now."""

    def backlogged(self) -> bool:
        """Held batches exceed `limits.max_held_bytes` and only waiting brings them under it:
        take no more messages for now."""

    def commit(self, final: bool) -> Committed | None:
        """Make what can be made durable durable; `final`: wait for every acknowledgement first."""

    def seal(self) -> Callable[[], None] | None:
        """Close the open unit to new batches and return the broker calls that commit it, to run
        off the engine thread while the next batch is classified; `end_commit` after they return.
        None when nothing is open, or when this mode commits on the engine thread only."""

    def end_commit(self) -> Committed:
        """What the sealed unit's commit made durable; the next `add` opens a new unit."""

    def abort(self) -> Committed:
        """Drop the open unit; the engine rewinds to the first offsets of what it returns."""


DeliveryCallback = Callable[[KafkaError | None, Message], None]

#: Offset-commit errors that say the group coordinator is moving, loading or unreachable (a
#: broker restart or failover), not that our generation is gone: at-least-once keeps its
#: acknowledged batches and commits them at the next interval instead of rewinding them.
COORDINATOR_AWAY = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._WAIT_COORD,
    }
)


def _source_of(out: Outgoing) -> tuple[str, int, int, str]:
    return (out.source.topic, out.source.partition, out.source.offset, out.topic)


class Sender:
    """Produces a batch's outputs, each with the `route.batch` header of its commit unit.

    An output the producer or the broker refuses for what it is (too large for
    `message.max.bytes` or the topic's `max.message.bytes`, an invalid record: `RECORD_REFUSALS`)
    is dead-lettered without its body: at once when `produce` refuses it, and after the abort
    and rewind when a delivery report does (`note` keeps the refusal, keyed by the output's
    source offset and topic, until the batch comes back). A poison message costs at most one
    rewind, never a loop. While the local queue is full it serves delivery reports, stamps
    liveness (the queue drains as the broker acknowledges) and gives up once the engine stops."""

    #: Refusals noted and not met again (their partition moved away) are capped: bounded memory.
    MAX_NOTED = 10_000

    def __init__(
        self,
        producer: Producer,
        dlq_topic: str,
        max_record_bytes: Callable[[], int],
        tick: Callable[[], None] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self._producer = producer
        self._dlq = dlq_topic
        self._max_record_bytes = max_record_bytes
        self._tick = tick
        self._should_stop = should_stop
        self._noted: dict[tuple[str, int, int, str], str] = {}

    def send(self, batch: Batch, unit: str, on_delivery: Callable[[Outgoing], DeliveryCallback | None]) -> int:
        """Produce the batch's outputs, replacing refused ones in `batch.outcome.outgoing` (so the
        metrics count what was written); return how many records were produced."""
        header = (BATCH_HEADER, unit.encode())
        sent: list[Outgoing] = []
        for noted in batch.outcome.outgoing:
            out = self._after_refusal(noted)
            if out is not None and (out := self._send(out, header, on_delivery)) is not None:
                sent.append(out)
        batch.outcome.outgoing[:] = sent
        return len(sent)

    def note(self, out: Outgoing, err: KafkaError | None, _msg: Message | None = None) -> None:
        """A delivery report: remember a refusal of `out` for when its batch is processed again."""
        if err is not None and err.code() in RECORD_REFUSALS and len(self._noted) < self.MAX_NOTED:
            self._noted[_source_of(out)] = err.str()

    def _after_refusal(self, out: Outgoing) -> Outgoing | None:
        error = self._noted.pop(_source_of(out), None)
        return out if error is None else self._stand_in(out, error)

    def _stand_in(self, out: Outgoing, error: str) -> Outgoing | None:
        """The dead letter that replaces a refused output, without a body; none for a shadow
        record (its source has its own output)."""
        if out.kind == "shadow":
            return None
        log.warning(
            "output refused by Kafka; dead-lettered without its body",
            extra={"topic": out.topic, "partition": out.source.partition, "offset": out.source.offset, "error": error},
        )
        reason = "too_large" if "too large" in error.lower() else "refused"
        message = f"{out.topic} refused the {out.kind} record: {error}"
        return refused_stand_in(out, self._dlq, reason, message, self._max_record_bytes())

    def _send(
        self, out: Outgoing, header: tuple[str, bytes], on_delivery: Callable[[Outgoing], DeliveryCallback | None]
    ) -> Outgoing | None:
        while True:
            try:
                headers = cast(Any, [*out.headers, header])
                self._producer.produce(
                    out.topic, value=out.value, key=out.key, headers=headers, on_delivery=on_delivery(out)
                )
                return out
            except BufferError as e:  # local queue full: serve delivery reports, then try again
                if self._should_stop():
                    raise DeliveryError("stopped while the producer's queue was full") from e
                self._tick()
                self._producer.poll(0.05)
            except KafkaException as e:
                err = kafka_error(e)
                if err.code() not in RECORD_REFUSALS:
                    raise
                stand_in = self._stand_in(out, err.str())
                if stand_in is None:
                    return None
                out = stand_in


def _timed(calls: Callable[[], None]) -> float:
    calls()
    return time.perf_counter()


def _raise_delivery(e: KafkaException, what: str) -> None:
    err = kafka_error(e)
    if err.fatal():
        raise FatalDeliveryError(err.str()) from e
    raise DeliveryError(f"{what}: {err.str()}") from e


class _UnitIds:
    """`instance:nonce:seq`: unique across restarts of one replica, so an id names one attempt.
    The nonce is random per process: in a container every process is PID 1."""

    def __init__(self, instance_id: str) -> None:
        self._prefix = f"{instance_id}:{secrets.token_hex(4)}:"
        self._seq = 0

    def next(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq}"


class Transactional:
    """Exactly-once: one transaction per commit interval, spanning its micro-batches. `tick`
    runs between retries of a commit (liveness while the broker is slow or down).

    Each transactional call is made as librdkafka asks (`kafka_util.retry_call`): a commit or
    abort that timed out is resumed by calling it again, an abort follows only an error that
    requires one, and a call that cannot complete within the transaction timeout (the broker
    aborts the transaction by then anyway) is `FatalDeliveryError`: the process exits non-zero
    and its restart fences what was left open."""

    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        settings: Settings,
        ids: _UnitIds,
        tick: Callable[[], None] = lambda: None,
        sender: Sender | None = None,
    ) -> None:
        self._tick = tick
        self._producer = producer
        limit = max_record_bytes(settings)
        self._sender = sender or Sender(producer, settings.topics.dlq, lambda: limit, tick)
        self._consumer = consumer
        self._interval_s = settings.commit.interval_ms / 1000
        self._max_items = settings.commit.max_items
        self._max_bytes = settings.limits.max_held_bytes
        #: How long a transactional call is retried or resumed before the process gives up.
        self._window_s = settings.kafka.transaction_timeout_ms / 1000
        self._ids = ids
        self._unit: str | None = None
        self._batches: list[Batch] = []
        self._items = 0
        self._bytes = 0
        self._started_at = 0.0
        #: Set by `seal`: the unit's commit is under way (maybe on another thread); no `add`.
        self._sealed = False

    def add(self, batch: Batch) -> None:
        if self._sealed:
            raise RuntimeError("add() while the unit's commit is under way")
        self._batches.append(batch)  # first: a failed produce must still rewind this batch
        self._items += len(batch.records)
        self._bytes += batch.inbound_bytes
        batch.unit = self._unit or self._begin()
        note = self._sender.note
        try:  # delivery reports come for refused records only (`delivery.report.only.error`)
            self._sender.send(batch, batch.unit, lambda out: functools.partial(note, out))
        except KafkaException as e:
            _raise_delivery(e, "produce failed")

    def _begin(self) -> str:
        """`begin_transaction` is local: it fails only when the producer is in an error state
        (fatal, or a call left unfinished), which no retry in this process repairs."""
        try:
            self._producer.begin_transaction()
        except KafkaException as e:
            raise FatalDeliveryError(f"begin_transaction failed: {kafka_error(e).str()}") from e
        self._unit, self._started_at = self._ids.next(), time.monotonic()
        return self._unit

    def held(self) -> list[Batch]:
        return list(self._batches)

    def due(self, now: float) -> bool:
        if self._unit is None:
            return False
        over_bytes = self._bytes >= self._max_bytes  # one more batch at most is added before the commit
        return now - self._started_at >= self._interval_s or self._items >= self._max_items or over_bytes

    def backlogged(self) -> bool:
        return False  # the unit commits early at the byte cap instead (`due`)

    def commit(self, final: bool) -> Committed | None:
        calls = self.seal()
        if calls is None:
            return None
        calls()
        return self.end_commit()

    def seal(self) -> Callable[[], None] | None:
        """The offsets and the group's metadata are read here, on the engine thread (the consumer
        is never called from another); the returned calls touch the producer only, which no one
        else calls until `end_commit` or `abort`. librdkafka allows one transaction per producer,
        so the next unit opens only after this one's commit returned."""
        if self._unit is None:
            return None
        offsets = next_offsets(r for b in self._batches for r in b.records)
        group = self._consumer.consumer_group_metadata()
        p = self._producer
        self._sealed = True

        def calls() -> None:
            try:
                retry_call(
                    lambda: p.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S), self._window_s, self._tick
                )
                retry_call(lambda: p.commit_transaction(CALL_TIMEOUT_S), self._window_s, self._tick)
            except KafkaException as e:  # only an error that requires an abort gets here
                raise DeliveryError(f"transaction not committed: {kafka_error(e).str()}") from e

        return calls

    def end_commit(self) -> Committed:
        return self._reset()

    def abort(self) -> Committed:
        """Abort the open transaction (an abort that timed out is resumed, never left behind:
        librdkafka would refuse every other call until it completes).

        The unit's records are drained first (bounded): librdkafka sends `EndTxn(abort)` as soon
        as it has *asked* to add a partition, even while the coordinator still answers that
        `AddPartitionsToTxn` with CONCURRENT_TRANSACTIONS (the last commit's markers not yet
        written: seen just after a broker freeze, when lost partitions abort the unit opened
        right after a commit). The coordinator then finds the last transaction complete and
        answers INVALID_TXN_STATE, which librdkafka makes fatal (librdkafka#4849). A record is
        sent only once its partition is in the transaction, so a drained unit is registered."""
        if self._unit is not None:
            try:  # whatever is left undelivered is purged by the abort
                self._producer.flush(ABORT_DRAIN_S)
            except KafkaException as e:  # a fatally failed producer raises its error again: no abort to make
                raise FatalDeliveryError(f"abort_transaction failed: {kafka_error(e).str()}") from e
            try:
                retry_call(lambda: self._producer.abort_transaction(CALL_TIMEOUT_S), self._window_s, self._tick)
            except KafkaException as e:
                raise FatalDeliveryError(f"abort_transaction failed: {kafka_error(e).str()}") from e
        return self._reset()

    def _reset(self) -> Committed:
        done = Committed(self._unit or "", self._batches)
        self._unit, self._batches, self._items, self._bytes, self._sealed = None, [], 0, 0, False
        return done


class AtLeastOnce:
    """Asynchronous produce; offsets committed at the interval up to the last micro-batch whose
    outputs were all acknowledged, in order (so per partition in order too). An offset commit
    the coordinator cannot take now (`COORDINATOR_AWAY`) is tried again at the next interval."""

    def __init__(
        self, producer: Producer, consumer: Consumer, settings: Settings, ids: _UnitIds, sender: Sender | None = None
    ) -> None:
        self._producer = producer
        limit = max_record_bytes(settings)
        self._sender = sender or Sender(producer, settings.topics.dlq, lambda: limit)
        self._consumer = consumer
        self._interval_s = settings.commit.interval_ms / 1000
        self._max_bytes = settings.limits.max_held_bytes
        self._bytes = 0
        self._ids = ids
        self._batches: deque[Batch] = deque()
        self._last_commit = time.monotonic()

    def add(self, batch: Batch) -> None:
        note = self._sender.note

        def on_delivery(out: Outgoing) -> DeliveryCallback:
            def delivered(err: KafkaError | None, msg: Message) -> None:
                batch.unacked -= 1
                if err is not None:
                    note(out, err, msg)
                    batch.error = batch.error or err

            return delivered

        batch.unit = self._ids.next()
        self._batches.append(batch)
        self._bytes += batch.inbound_bytes
        try:
            # after: reports served while the queue was full have already counted down
            batch.unacked += self._sender.send(batch, batch.unit, on_delivery)
        except KafkaException as e:
            _raise_delivery(e, "produce failed")
        self._producer.poll(0)

    def held(self) -> list[Batch]:
        return list(self._batches)

    def due(self, now: float) -> bool:
        self._producer.poll(0)  # serve delivery reports: they decide what can be committed
        return bool(self._batches) and now - self._last_commit >= self._interval_s

    def commit(self, final: bool) -> Committed | None:
        if final and self._producer.flush(CALL_TIMEOUT_S):
            raise DeliveryError("outputs not acknowledged within the flush timeout")
        self._producer.poll(0)
        self._last_commit = time.monotonic()
        acked: list[Batch] = []
        for batch in self._batches:
            if batch.error is not None:
                raise DeliveryError(f"output not delivered: {batch.error.str()}")
            if batch.unacked:
                break
            acked.append(batch)
        if not acked:
            return None
        try:
            self._consumer.commit(offsets=next_offsets(r for b in acked for r in b.records), asynchronous=False)
        except KafkaException as e:
            err = kafka_error(e)
            if final or err.code() not in COORDINATOR_AWAY:  # final: the partitions move now, drop them
                _raise_delivery(e, "offset commit failed")
            # the outputs are acknowledged: rewinding would only write them twice; commit later
            log.warning("offset commit deferred", extra={"error": err.str(), "batches": len(acked)})
            return None
        for batch in acked:
            self._batches.popleft()
            self._bytes -= batch.inbound_bytes
        return Committed(",".join(b.unit for b in acked), acked)

    def seal(self) -> Callable[[], None] | None:
        return None  # offsets are committed with the consumer, on the engine thread (`commit`)

    def end_commit(self) -> Committed:
        raise RuntimeError("at-least-once commits on the engine thread only")

    def abort(self) -> Committed:
        """Wait out the outstanding deliveries (none may land after the rewind), drop them all."""
        self._producer.flush(CALL_TIMEOUT_S)
        dropped = Committed(",".join(b.unit for b in self._batches), list(self._batches))
        self._batches.clear()
        self._bytes = 0
        return dropped

    def backlogged(self) -> bool:
        """Outputs not yet acknowledged (a slow or unreachable broker) hold their batches: the
        engine pauses consuming until acknowledgements bring the held bytes under the cap."""
        return self._bytes >= self._max_bytes


@dataclass(slots=True)
class Committing:
    """A sealed unit's commit, running on the committer thread: its call and when it started
    (perf counter, for the commit histogram; wall clock, for the stage metrics)."""

    future: Future[float]  # the perf counter when the commit returned
    started: float
    started_wall: float


@dataclass(slots=True)
class InFlight:
    """The batch at the classifier: its records, the call, when it was handed over (monotonic,
    for the stuck check; wall clock, for the stage metrics) and when the call finished."""

    records: list[Record]
    future: Future[Outcome]
    started: float
    submitted_at: float
    classified_at: float = 0.0

    def batch(self, outcome: Outcome) -> Batch:
        return Batch(self.records, outcome, submitted_at=self.submitted_at, classified_at=self.classified_at)


class ConfluentEngine:
    def __init__(self, settings: Settings, pipeline: Pipeline, hooks: Hooks) -> None:
        check_access(settings)  # before any client connects: a refused login is one line, not every client's
        self.settings = settings
        self.pipeline = pipeline
        self.hooks = hooks
        self.exactly_once = settings.delivery == "exactly_once"
        self._stop = False
        self._fatal: KafkaError | None = None
        #: a Kafka call is stuck in librdkafka (`kafka_util.bounded`): closing the producer could block too
        self._wedged = False
        #: why the cluster refuses us (credentials, TLS, an ACL): stop, and `run` raises KafkaAccessError
        self._refusal: str | None = None
        self._resources = Resources.of(settings, required_topics(settings, pipeline.router))
        self.processed = 0
        #: perf_counter() of the first consumed record and of the last commit: throughput window.
        self.first_record_at: float | None = None
        self.last_commit_at: float | None = None
        self._classifier = ThreadPoolExecutor(1, thread_name_prefix="classify")
        self._inflight: InFlight | None = None
        #: Exactly-once: the commit running off the engine thread, the batches classified while it
        #: runs (produced into the next transaction once it returns), and when the last began.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._committing: Committing | None = None
        self._waiting: list[Batch] = []
        self._commit_started_at = 0.0
        self._floor_s = settings.commit.min_interval_ms / 1000
        #: Set when the classifier's batch or a commit finishes: what the loop waits on.
        self._wake = threading.Event()
        self._sizer = BatchSizer(settings.batch.max_ms / 1000, settings.batch.max_items)
        #: Seek targets left by an abort inside a rebalance callback, applied after the poll.
        self._rewind_to: dict[tuple[str, int], int] = {}
        self._in_callback = False
        #: Consuming paused by `_throttle` (at-least-once, over the held-bytes cap).
        self._paused = False
        #: Last commit, or last turn with nothing in hand; and whether a failure left work to redo.
        self._progress_at = time.monotonic()
        self._redo = False
        self._assigned: set[tuple[str, int]] = set()
        self._assigned_at: float | None = None
        self._assigned_lock = threading.Lock()
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
                # exactly-once needs delivery reports only for refused records (`Sender.note`)
                **({"delivery.report.only.error": True} if self.exactly_once else {}),
            }
        )
        ids = _UnitIds(settings.kafka.instance_id)
        sender = Sender(
            self.producer, settings.topics.dlq, lambda: pipeline.max_record_bytes, self._alive, self._should_stop
        )
        self.delivery: Delivery = (
            Transactional(self.producer, self.consumer, settings, ids, self._alive, sender)
            if self.exactly_once
            else AtLeastOnce(self.producer, self.consumer, settings, ids, sender)
        )
        self.housekeeping = Housekeeping(settings, pipeline.router, hooks, self._assigned_now)

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop commits what it has classified, then exits."""
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
                admin = admin_client(self.settings)
                self._retry("create topics", lambda: ensure_topics(admin, names, t.partitions, t.replication))
            self._fit_to_topics()
            if self.exactly_once:
                self._retry("init_transactions", lambda: self.producer.init_transactions(CALL_TIMEOUT_S))
            self.consumer.subscribe(
                [self.settings.topics.input],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self.housekeeping.start()
            self._loop(max_messages, idle_exit_s)
            self._settle()
        finally:
            self._close()
        if self._refusal is not None:
            raise KafkaAccessError(self._refusal)
        if self._fatal is not None:
            raise FatalDeliveryError(f"fatal Kafka error: {self._fatal.str()}")

    def _fit_to_topics(self) -> None:
        """Size records against the output topics' `max.message.bytes` too, where it is below the
        producer's limit: such a record is dead-lettered in its batch, before any produce."""
        if self._should_stop():
            return
        outputs = set(required_topics(self.settings, self.pipeline.router)) - {self.settings.topics.input}
        try:
            smallest = smallest_message_limit(self.housekeeping.admin, outputs)
        except KafkaException as e:
            log.warning("output topics' size limits not available", extra={"error": str(e)})
            return
        if smallest is not None and smallest - RECORD_OVERHEAD_BYTES < self.pipeline.max_record_bytes:
            self.pipeline.max_record_bytes = smallest - RECORD_OVERHEAD_BYTES
            log.info("records sized to the output topics' limit", extra={"max_message_bytes": smallest})

    def _loop(self, max_messages: int | None, idle_exit_s: float | None) -> None:
        backoff = Backoff(self._alive)
        last_message = time.monotonic()
        while not self._should_stop():
            if not self._classifier_stuck():
                self._alive()
            self._throttle()
            try:
                if self._collect_commit():
                    backoff.reset()
                if self._turn(self._room(max_messages)):
                    last_message = time.monotonic()
                if self._commit_due(max_messages):
                    backoff.reset()
            except (InferenceError, DeliveryError) as e:
                self._fail(e)
                backoff.wait(self._should_stop)
                continue
            if not self._redo and not self._in_hand() and not self.delivery.held():
                self._progress_at = time.monotonic()  # nothing in hand: idle is not stuck
            if max_messages is not None and self.processed >= max_messages:
                log.info("max messages reached", extra={"processed": self.processed})
                return
            if self._idle(last_message, idle_exit_s):
                log.info("idle, exiting", extra={"idle_exit_s": idle_exit_s, "processed": self.processed})
                return

    def _throttle(self) -> None:
        """Pause the assigned partitions while the held batches are over the byte cap (outputs
        waiting for acknowledgements); resume once under it. The loop keeps polling meanwhile
        (rebalances, liveness); a partition assigned while paused is paused at the next turn."""
        if self.delivery.backlogged():
            if not self._paused:
                cap = self.settings.limits.max_held_bytes
                log.info("outputs unacknowledged over the byte cap; pausing", extra={"max_held_bytes": cap})
            self._paused = True
            with contextlib.suppress(KafkaException):  # nothing assigned right now
                self.consumer.pause(self.consumer.assignment())
        elif self._paused:
            self._paused = False
            with contextlib.suppress(KafkaException):
                self.consumer.resume(self.consumer.assignment())

    def _close(self) -> None:
        self.housekeeping.stop()
        self._classifier.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        try:
            self.consumer.close()  # leaves the group, so the partitions move at once
        except (KafkaException, RuntimeError) as e:
            log.warning("consumer close failed", extra={"error": str(e)})
        if self._wedged:
            return
        try:
            self.producer.flush(5.0)
        except KafkaException as e:  # a fatally failed producer (fenced, refused) raises its error again
            log.warning("producer flush failed", extra={"error": str(e)})

    def _room(self, max_messages: int | None) -> int:
        """How many more messages may be polled now: `max_messages` counts what is held too."""
        if max_messages is None:
            return self.settings.batch.max_items
        held = sum(len(b.records) for b in [*self.delivery.held(), *self._waiting])
        if self._inflight is not None:
            held += len(self._inflight.records)
        return max(0, min(self.settings.batch.max_items, max_messages - self.processed - held))

    def _in_hand(self) -> bool:
        """A batch at the classifier, or classified and waiting for a commit to be produced."""
        return self._inflight is not None or bool(self._waiting)

    def _commit_due(self, max_messages: int | None) -> bool:
        """When to commit. Exactly-once: as soon as nothing is in hand and `min_interval_ms` has
        passed since the last commit began (a message waits for no interval at light load), at
        the interval under load (when something always is), early at the unit's size caps; the
        commit runs on the committer thread while the next batch is classified. At-least-once:
        offsets at the interval. Both: at once, and on this thread, when the last of
        `max_messages` is classified."""
        if self._committing is not None:
            return False
        last = max_messages is not None and not self._in_hand() and self._room(max_messages) == 0
        now = time.monotonic()
        due = self.delivery.due(now) or (
            self.exactly_once and not self._in_hand() and now - self._commit_started_at >= self._floor_s
        )
        if last or not self.exactly_once:
            return self._commit_if(due or last, final=last)
        if not due or (calls := self.delivery.seal()) is None:
            return False
        self._commit_started_at = now
        committing = Committing(self._committer.submit(_timed, calls), time.perf_counter(), time.time())
        committing.future.add_done_callback(lambda _f: self._wake.set())
        self._committing = committing
        return False

    def _collect_commit(self, wait: bool = False) -> bool:
        """Finish the commit under way once it returned (`wait`: block until it does): count
        what it made durable, then produce the batches classified meanwhile into a new unit.
        A failed commit raises here, on the engine thread, and is handled as any other."""
        committing = self._committing
        if committing is None or not (wait or committing.future.done()):
            return False
        self._committing = None
        ended = committing.future.result()  # DeliveryError: the sealed unit is still held, `_fail` aborts it
        self._committed(self.delivery.end_commit(), committing.started, committing.started_wall, ended)
        self._produce_waiting()
        return True

    def _produce_waiting(self) -> None:
        """Produce the classified batches into the open unit, unless a commit is under way."""
        while self._waiting and self._committing is None:
            self._add(self._waiting.pop(0))

    def _poll_wait(self, wait_s: float) -> float:
        """How long the next poll may block: briefly while a commit runs (its end lets the waiting
        batches be produced), and no longer than until a deferred commit is due."""
        if self._committing is not None:
            return min(wait_s, COMMIT_POLL_S)
        if self.exactly_once and self.delivery.held():
            return min(wait_s, max(0.0, self._commit_started_at + self._floor_s - time.monotonic()))
        return wait_s

    def _idle(self, last_message: float, idle_exit_s: float | None) -> bool:
        """Idle time counts from the last message or the last assignment, whichever is later: a
        slow group join on a busy machine is not an empty topic."""
        if idle_exit_s is None or self._assigned_at is None or self._in_hand() or self.delivery.held():
            return False
        return time.monotonic() - max(last_message, self._assigned_at) > idle_exit_s

    def _alive(self) -> None:
        """Stamp liveness, unless work has been in hand for PROGRESS_STUCK_S without a commit: a
        worker retrying a failing batch or waiting on a commit forever must not look healthy."""
        if time.monotonic() - self._progress_at < PROGRESS_STUCK_S:
            self.hooks.on_loop()
        else:
            self.hooks.on_stalled()

    def _classifier_stuck(self) -> bool:
        return self._inflight is not None and time.monotonic() - self._inflight.started > CLASSIFIER_STUCK_S

    # -- the pipelined turn -----------------------------------------------------------------

    def _turn(self, room: int) -> bool:
        """One wait, for a message (classifier idle) or for the classifier or a commit. When batch
        N comes back, batch N+1 is handed over first and N produced after: the classifier never
        waits for a produce. N is held (`_waiting`) before the poll for N+1, so a revoke inside
        that poll commits it. While a commit runs, one classified batch may wait for it; the
        next is taken once it returned. True when messages were taken."""
        if self._committing is not None and self._waiting:
            room = 0  # bounded: one batch waiting for the commit, at most one at the classifier
        if self._inflight is None:
            if room == 0:
                self._wake.wait(self._poll_wait(IDLE_POLL_S))
                self._wake.clear()
                return False
            fill_s = self.settings.batch.max_wait_ms / 1000
            return self._submit(self._take(room, self._poll_wait(IDLE_POLL_S), fill_s))
        inflight = self._inflight
        self._wake.clear()
        if not inflight.future.done():
            self._wake.wait(IDLE_POLL_S)
            if not inflight.future.done():
                return False
        outcome = inflight.future.result()  # InferenceError: left in flight for `_fail`
        self._inflight = None
        self._sizer.classified(len(inflight.records), outcome.inference_seconds)
        self._waiting.append(inflight.batch(outcome))
        if self._committing is not None:
            room = 0 if len(self._waiting) > 1 else room
        # no fill wait here: it would idle the classifier; the backlog built up during N is the batch
        took = self._submit(self._take(room, 0.0, 0.0))
        self._produce_waiting()
        return took

    def _submit(self, records: list[Record]) -> bool:
        if not records:
            return False
        if self.first_record_at is None:
            self.first_record_at = time.perf_counter()
        inflight = InFlight(
            records, self._classifier.submit(self.pipeline.process, records), time.monotonic(), time.time()
        )
        inflight.future.add_done_callback(lambda _f: self._classified(inflight))
        self._inflight = inflight
        return True

    def _classified(self, inflight: InFlight) -> None:
        """On the classifier's thread, as its call returns: stamp the time, wake the loop."""
        inflight.classified_at = time.time()
        self._wake.set()

    def _add(self, batch: Batch) -> None:
        self.delivery.add(batch)
        batch.produced_at = time.time()

    def _take(self, want: int, wait_s: float, fill_s: float) -> list[Record]:
        """A batch as soon as one message is there: the first message (waiting up to `wait_s`),
        then whatever else is already fetched (up to `want`), waiting up to `fill_s` more for it
        to fill (`batch.max_wait_ms` when the classifier was idle, else nothing).

        The batch is as large as the backlog that built up while the classifier worked on the
        previous one (a dynamic batcher): one message at light load; under a backlog, about
        `batch.max_ms` of classifier time, growing while the backlog lasts (`BatchSizer`)."""
        if want <= 0:
            return []
        want = min(want, self._sizer.limit())
        messages: list[Message] = []
        first = self.consumer.poll(wait_s)
        if first is not None:
            messages.append(first)
            if want > 1:
                messages.extend(self.consumer.consume(num_messages=want - 1, timeout=fill_s))
            self._sizer.taken(len(messages), want)
        records = self._records(messages)
        if self._rewind_to:  # a rebalance callback aborted: these follow what must be redone
            self._rewind([*records])
            return []
        assigned = self._assigned_now()
        return [r for r in records if (r.topic, r.partition) in assigned]

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

    # -- commit, failure, rewind ------------------------------------------------------------

    def _commit_if(self, due: bool, final: bool = False) -> bool:
        """Commit on this thread when due; count and report what was committed (once, after)."""
        if not due:
            return False
        self._commit_started_at = time.monotonic()
        started, started_wall = time.perf_counter(), time.time()
        done = self.delivery.commit(final)
        if done is None:
            return False
        self._committed(done, started, started_wall, time.perf_counter())
        return True

    def _committed(self, done: Committed, started: float, started_wall: float, ended: float) -> None:
        self.last_commit_at = ended
        self.hooks.on_commit(self.last_commit_at - started)
        self._stages(done, started_wall, started_wall + self.last_commit_at - started)
        self._progress_at, self._redo = time.monotonic(), False
        now_ms = int(time.time() * 1000)
        messages = 0
        for batch in done.batches:
            messages += len(batch.records)
            self.hooks.on_batch(batch.outcome)
            self.hooks.on_committed(batch.outcome.outgoing, now_ms)
        self.processed += messages
        log.debug("batch committed", extra={"batch": done.unit, "messages": messages, "batches": len(done.batches)})

    def _stages(self, done: Committed, commit_started: float, committed: float) -> None:
        """Where each committed message's time went, from its inbound timestamp to the commit."""
        for batch in done.batches:
            waits = [batch.submitted_at - r.timestamp_ms / 1000 for r in batch.records if r.timestamp_ms is not None]
            spans = {
                "classify": batch.classified_at - batch.submitted_at,
                "produce": batch.produced_at - batch.classified_at,
                "commit_wait": commit_started - batch.produced_at,
                "commit": committed - commit_started,
            }
            self.hooks.on_stages(waits, spans, len(batch.records))

    def _settle(self) -> None:
        """Finish what is in hand: collect the classifier's batch, commit everything. Used on
        stop and when partitions are revoked; a failure aborts and leaves a rewind."""
        if self._fatal is not None or self._refusal is not None:
            return
        try:
            self._collect_commit(wait=True)
            if self._inflight is not None:
                inflight = self._inflight
                outcome = inflight.future.result()
                self._inflight = None
                self._waiting.append(inflight.batch(outcome))
            self._produce_waiting()
            self._commit_if(True, final=True)
        except (InferenceError, DeliveryError) as e:
            self._fail(e)

    def _fail(self, e: InferenceError | DeliveryError, counted: bool = True) -> None:
        """Abort the whole commit unit and the batch at the classifier; seek back to their
        first offsets so they are processed again. `counted`: a failed batch in the metrics
        (lost partitions are a rebalance, not a delivery failure)."""
        if self._refused_delivery(e) and isinstance(e, FatalDeliveryError):
            return  # the producer is fatally refused: nothing to abort; `run` names the cause
        if isinstance(e, FatalDeliveryError):
            log.critical("fatal delivery error", extra={"error": str(e)})
            self._wedged = self._wedged or isinstance(e, WedgedClientError)
            self._fatal = self._fatal or KafkaError(KafkaError._FATAL, str(e), fatal=True)
            return
        stage = "inference" if isinstance(e, InferenceError) else "delivery"
        if counted:
            self.hooks.on_batch_failed(stage)
        held = self._drop_inflight()
        held.extend(r for b in self._waiting for r in b.records)
        self._waiting.clear()
        try:
            dropped = self.delivery.abort()
        except FatalDeliveryError as fatal:
            self._fail(fatal)
            return
        held.extend(r for b in dropped.batches for r in b.records)
        self._redo = self._redo or bool(held)
        log.warning(
            "batch not delivered; rewinding",
            extra={"batch": dropped.unit, "stage": stage, "error": str(e), "messages": len(held)},
        )
        if stage == "delivery":
            self.housekeeping.check_topics_soon()
        self._rewind(held)

    def _refused_delivery(self, e: InferenceError | DeliveryError) -> bool:
        """Whether the cluster refused this delivery (an ACL): the transaction coordinator names
        the refused topic only in a log line, which `poll` serves to `ClientLog` first."""
        err = kafka_error_of(e) if isinstance(e, DeliveryError) else None
        if err is None:
            return False
        with contextlib.suppress(KafkaException):  # a fatally failed producer raises its error again
            self.producer.poll(0)
        return self._refused(err, "producer")

    def _drop_inflight(self) -> list[Record]:
        """Let the classifier and a commit under way finish (their results must not land after
        the rewind, and the producer takes no abort while a commit call runs); a commit that
        succeeded is counted, one that failed is left to the abort."""
        with contextlib.suppress(DeliveryError):  # a failed commit's unit is aborted after this
            self._collect_commit(wait=True)
        if self._inflight is None:
            return []
        inflight, self._inflight = self._inflight, None
        with contextlib.suppress(InferenceError):
            inflight.future.result()  # let it finish: its result must not land after the rewind
        return inflight.records

    def _rewind(self, records: Sequence[Record]) -> None:
        """Seek each assigned partition back to the first offset of what was dropped (merged
        with targets left by a rebalance callback). Inside a callback only the targets are
        kept; the seek happens after the poll returns."""
        for key, offset in first_offsets(records).items():
            self._rewind_to[key] = min(self._rewind_to.get(key, offset), offset)
        if self._in_callback:
            return
        assigned = self._assigned_now()
        for (topic, partition), offset in sorted(self._rewind_to.items()):
            if (topic, partition) not in assigned:
                continue
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as e:  # the consumer would read on past what was dropped: lost
                err = kafka_error(e)
                log.critical("seek failed after an abort", extra={"partition": partition, "error": err.str()})
                self._fatal = self._fatal or KafkaError(KafkaError._FATAL, f"seek failed: {err.str()}", fatal=True)
        self._rewind_to.clear()

    # -- callbacks ----------------------------------------------------------------------------

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        backoff = Backoff(self.hooks.on_loop)
        while not self._should_stop():
            self.hooks.on_loop()
            try:
                return fn()
            except DeliveryError as e:  # e.g. a topic we may not create
                err_in = kafka_error_of(e)
                if err_in is not None and self._refused(err_in, "admin"):
                    return None
                raise
            except KafkaException as e:
                err = kafka_error(e)
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

    def _assigned_now(self) -> set[tuple[str, int]]:
        """Kept from the rebalance callbacks, so the housekeeping thread never calls the consumer."""
        with self._assigned_lock:
            return set(self._assigned)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        with self._assigned_lock:
            self._assigned |= {(p.topic, p.partition) for p in partitions}
        self._assigned_at = time.monotonic()
        self.hooks.on_assign([(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the open transaction before the partitions move (or abort it)."""
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})
        self._in_callback_run(self._settle)
        self._forget(partitions)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Our generation is gone: a commit would be fenced, so abort and redo what is kept."""
        log.warning("partitions lost", extra={"partitions": [p.partition for p in partitions]})
        self._in_callback_run(self._abandon)
        self._forget(partitions)

    def _abandon(self) -> None:
        if self._in_hand() or self._committing is not None or self.delivery.held():
            self._fail(DeliveryError("partitions lost"), counted=False)

    def _in_callback_run(self, fn: Callable[[], None]) -> None:
        self._in_callback = True
        try:
            fn()
        finally:
            self._in_callback = False

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        with self._assigned_lock:
            self._assigned -= gone
        for key in gone:
            self._rewind_to.pop(key, None)
        self.hooks.on_revoke(sorted(gone))
