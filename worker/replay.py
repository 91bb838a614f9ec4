"""`classify-worker replay`: re-drive dead letters to the input topic, each exactly once.

A consume-transform-produce loop of its own: it reads the DLQ with read_committed, gives each
selected message back its original value, key and headers (minus what dead-lettering added,
plus an incremented `replay.count`), and produces them in a transaction that also commits its
consumer group's offsets. A crash aborts the open transaction; a restart (same transactional
id, so it fences the dead one at once) resumes from the committed offsets, so nothing is
re-driven twice. It stops at the DLQ's end offsets as they were when it started (or the window
end): messages that fail again while it runs wait for the next run, never loop within one.

The group remembers how far a selection got. Its default name is derived from the selection
(source, target, reasons, window), so re-running the same command resumes or does nothing, and
a different selection starts from its window's beginning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from worker.config import Settings
from worker.errors import DeliveryError, FatalDeliveryError, KafkaAccessError
from worker.kafka_errors import ClientLog, Resources, Side, explain, kafka_error_of
from worker.kafka_util import (
    CALL_TIMEOUT_S,
    RECORD_REFUSALS,
    TP,
    Backoff,
    BoundedReader,
    kafka_error,
    offsets_at,
    retry_call,
    topic_partitions,
    watermarks,
)
from worker.messages import (
    BATCH_HEADER,
    ERROR_MESSAGE,
    ERROR_REASON,
    REPLAY_COUNT,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    VALUE_SHA256,
)
from worker.records import Headers

log = logging.getLogger(__name__)

#: What dead-lettering adds to a message (the engine's batch lineage header included): removed on
#: replay so the re-driven message is the original again.
GAINED_HEADERS = frozenset({ERROR_REASON, ERROR_MESSAGE, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, BATCH_HEADER})
#: A dead letter without an `error.reason` header (written by something else) is reported as this.
UNKNOWN_REASON = "unknown"
#: Longest wait for the next messages; bounds how late a stop request is noticed.
POLL_S = 0.2
#: Longest wait after consecutive aborted transactions (shorter than a worker's: a replay is an
#: operator watching a terminal, not a pod waiting out an outage).
BACKOFF_MAX_S = 10.0
#: Examples a dry run prints: enough to recognise the failure, few enough to read.
DRY_RUN_EXAMPLES = 5

#: `unsendable`: the target refuses the record (e.g. larger than `message.max.bytes`), or the
#: dead letter kept no body (it was too large to keep): skipped and counted, never retried.
Decision = Literal["replay", "poison", "filtered", "unsendable"]


@dataclass(frozen=True)
class Selection:
    """Which dead letters to re-drive, from where to where."""

    source: str
    target: str
    reasons: frozenset[str] = frozenset()  # empty: every reason
    start_offset: int | None = None  # per partition, inclusive
    end_offset: int | None = None  # per partition, exclusive
    since_ms: int | None = None
    until_ms: int | None = None
    max_replays: int = 3

    def default_group(self) -> str:
        """Stable for one selection, different for another: see the module docstring."""
        doc = {
            "source": self.source,
            "target": self.target,
            "reasons": sorted(self.reasons),
            "window": [self.start_offset, self.end_offset, self.since_ms, self.until_ms],
        }
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]
        return f"classify-replay-{digest}"


def header(headers: Headers, name: str) -> bytes | None:
    """The last value of a header (the one appended most recently)."""
    for key, value in reversed(headers):
        if key == name:
            return value
    return None


def reason_of(headers: Headers) -> str:
    raw = header(headers, ERROR_REASON)
    return raw.decode("utf-8", "replace") if raw else UNKNOWN_REASON


def replay_count(headers: Headers) -> int:
    """0 when absent or not a number: the replayed copy then carries a well-formed 1."""
    raw = header(headers, REPLAY_COUNT)
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
        return 0


def decide(headers: Headers, selection: Selection) -> Decision:
    if selection.reasons and reason_of(headers) not in selection.reasons:
        return "filtered"
    if replay_count(headers) >= selection.max_replays:
        return "poison"
    if header(headers, VALUE_SHA256) is not None:  # dead-lettered without its body
        return "unsendable"
    return "replay"


def replayed_headers(headers: Headers) -> Headers:
    """The original headers: dead-letter headers removed, `replay.count` incremented."""
    kept = [(k, v) for k, v in headers if k not in GAINED_HEADERS and k != REPLAY_COUNT]
    return [*kept, (REPLAY_COUNT, str(replay_count(headers) + 1).encode())]


@dataclass
class Summary:
    """What one run did, by dead-letter reason; counted only once a transaction has committed."""

    group: str
    dry_run: bool
    replayed: Counter[str] = field(default_factory=Counter)
    poison: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    unsendable: Counter[str] = field(default_factory=Counter)
    #: The run was stopped (SIGTERM/SIGINT) before the end of its window: the CLI exits non-zero.
    interrupted: bool = False
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, decisions: list[tuple[Decision, str]]) -> None:
        for decision, reason in decisions:
            counts = {"replay": self.replayed, "poison": self.poison, "filtered": self.filtered}
            counts.get(decision, self.unsendable)[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "dry_run": self.dry_run,
            "replayed": dict(sorted(self.replayed.items())),
            "skipped_max_replays": dict(sorted(self.poison.items())),
            "not_selected": dict(sorted(self.filtered.items())),
            "skipped_unsendable": dict(sorted(self.unsendable.items())),
            "interrupted": self.interrupted,
            "examples": self.examples,
        }


def example(m: Message, headers: Headers) -> dict[str, Any]:
    """Where a dead letter is and why it failed; never its body."""
    text = {
        k: (header(headers, k) or b"").decode("utf-8", "replace")
        for k in (ERROR_MESSAGE, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)
    }
    return {
        "partition": m.partition(),
        "offset": m.offset(),
        "key": (m.key() or b"").decode("utf-8", "replace"),
        "reason": reason_of(headers),
        "message": text[ERROR_MESSAGE],
        "source": f"{text[SOURCE_TOPIC]}:{text[SOURCE_PARTITION]}:{text[SOURCE_OFFSET]}",
        "replay_count": replay_count(headers),
        "bytes": len(m.value() or b""),
    }


def next_offsets(messages: list[Message]) -> dict[TP, int]:
    """Last offset + 1 per partition: what to commit after a batch."""
    out: dict[TP, int] = {}
    for m in messages:
        tp = (m.topic() or "", m.partition() or 0)
        out[tp] = max(out.get(tp, 0), (m.offset() or 0) + 1)
    return out


class Replayer:
    """One run of `classify-worker replay` (construct, then `run()`)."""

    def __init__(
        self,
        settings: Settings,
        selection: Selection,
        *,
        group: str | None = None,
        batch_size: int = 500,
        max_rate: float | None = None,
    ) -> None:
        self.selection = selection
        self.group = group or selection.default_group()
        #: With a rate cap, about ten transactions a second: the pace stays even.
        self.batch_size = max(1, min(batch_size, int(max_rate / 10))) if max_rate else batch_size
        self.max_rate = max_rate
        self._stop = False
        self._resources = Resources(selection.source, self.group, self.group, (selection.target,))
        #: librdkafka's log lines (they alone name a topic a transaction was refused) and the
        #: first refusal its error callbacks reported: the run ends with that one line
        self._client_log = ClientLog()
        self._refusal: str | None = None
        #: Which client the current step uses, for naming the ACL a refusal lacks.
        self._side: Side = "consumer"
        client_logger = self._client_log
        self.consumer = Consumer(
            {
                **settings.librdkafka_consumer(),
                "logger": client_logger,
                "error_cb": lambda err: self._on_error(err, "consumer"),
                # must win: the replay's own group, and end-of-partition events for BoundedReader
                "group.id": self.group,
                "enable.partition.eof": True,
            }
        )
        #: How long a transactional call is retried or resumed before the run gives up.
        self._window_s = settings.kafka.transaction_timeout_ms / 1000
        self._producer_conf: dict[str, Any] = {
            **settings.librdkafka_producer(),
            "logger": client_logger,
            "error_cb": lambda err: self._on_error(err, "producer"),
            # must win: one stable id per group, so a restarted replay fences a killed one at once
            "transactional.id": self.group,
        }

    def request_stop(self) -> None:
        """Safe from a signal handler: the open transaction is finished, then the run ends."""
        self._stop = True

    def run(self, dry_run: bool = False) -> Summary:
        """Replay (or count, with `dry_run`) the selection; raises `DeliveryError` subclasses."""
        summary = Summary(self.group, dry_run)
        try:
            producer = None if dry_run else self._producer()
            reader = self._reader()
            if producer is None:
                self._count(reader, summary)
            else:
                self._replay(reader, producer, summary)
        except (KafkaException, DeliveryError) as e:
            self._explain(e)
            if isinstance(e, DeliveryError):
                raise
            raise DeliveryError(f"replay failed: {kafka_error(e).str()}") from e
        finally:
            self.consumer.close()
        if self._refusal is not None:
            raise KafkaAccessError(self._refusal)
        return summary

    def _explain(self, e: KafkaException | DeliveryError) -> None:
        """A Kafka error that waiting cannot fix (credentials, TLS, a missing ACL) becomes the one
        line of `worker.kafka_errors`, as the worker's are; the CLI exits `EXIT_ACCESS`."""
        err = kafka_error_of(e)
        if err is None:
            return
        cause = explain(err, self._resources, self._side, self._client_log.denied_topics)
        if cause is not None:
            raise KafkaAccessError(cause) from e
        if self._refusal is not None:
            raise KafkaAccessError(self._refusal) from e

    def _on_error(self, err: KafkaError, side: Side) -> None:
        """librdkafka's error callback: a refused login or TLS handshake ends the run."""
        cause = explain(err, self._resources, side, self._client_log.denied_topics)
        if cause is not None and self._refusal is None:
            self._refusal = cause
            self._stop = True

    # -- setup -------------------------------------------------------------------------------

    def _producer(self) -> Producer:
        self._side = "producer"
        producer = Producer(self._producer_conf)
        # before reading committed offsets: aborts a killed predecessor's open transaction
        retry_call(lambda: producer.init_transactions(CALL_TIMEOUT_S))
        return producer

    def _reader(self) -> BoundedReader:
        self._side = "consumer"
        tps = topic_partitions(self.consumer, self.selection.source)
        starts, ends = self._window(tps)
        committed = self.consumer.committed([TopicPartition(*tp) for tp in tps], timeout=CALL_TIMEOUT_S)
        starts = _combine(starts, {(tp.topic, tp.partition): tp.offset for tp in committed}, max)
        log.info("replay window", extra={"group": self.group, "starts": _show(starts), "ends": _show(ends)})
        return BoundedReader(self.consumer, starts, ends)

    def _window(self, tps: list[TP]) -> tuple[dict[TP, int], dict[TP, int]]:
        """Start and end offsets per partition: the log, narrowed by the offset and time window."""
        s = self.selection
        marks = watermarks(self.consumer, tps)
        high = {tp: hi for tp, (_, hi) in marks.items()}
        starts = {tp: lo for tp, (lo, _) in marks.items()}
        ends = dict(high)
        if s.start_offset is not None:
            starts = _combine(starts, dict.fromkeys(tps, s.start_offset), max)
        if s.since_ms is not None:
            starts = _combine(starts, offsets_at(self.consumer, tps, s.since_ms, high), max)
        if s.end_offset is not None:
            ends = _combine(ends, dict.fromkeys(tps, s.end_offset), min)
        if s.until_ms is not None:
            ends = _combine(ends, offsets_at(self.consumer, tps, s.until_ms, high), min)
        return starts, ends

    # -- the loops ---------------------------------------------------------------------------

    def _count(self, reader: BoundedReader, summary: Summary) -> None:
        while not reader.done() and not self._stop:
            for m in reader.take(self.batch_size, POLL_S):
                headers = cast(Headers, m.headers() or [])
                decision = decide(headers, self.selection)
                summary.add([(decision, reason_of(headers))])
                if decision == "replay" and len(summary.examples) < DRY_RUN_EXAMPLES:
                    summary.examples.append(example(m, headers))
        summary.interrupted = not reader.done()

    def _replay(self, reader: BoundedReader, producer: Producer, summary: Summary) -> None:
        committed = dict(reader.position)
        started = time.monotonic()
        backoff = Backoff(max_s=BACKOFF_MAX_S)
        while not reader.done() and not self._stop:
            self._side = "consumer"
            batch = reader.take(self.batch_size, POLL_S)
            if not batch:
                continue
            decisions = [self._decision(m) for m in batch]
            offsets = next_offsets(batch)
            self._side = "producer"
            try:
                self._transact(producer, batch, decisions, offsets)
            except KafkaException as e:  # only an error that requires an abort gets here
                self._explain(e)  # a missing ACL: retrying cannot help
                log.warning("replay transaction aborted; retrying", extra={"error": kafka_error(e).str()})
                self._abort(producer)
                reader.rewind({tp: committed[tp] for tp in offsets})
                backoff.wait(lambda: self._stop)
                continue
            backoff.reset()
            committed.update(offsets)
            summary.add([(d, r) for d, r, _ in decisions])
            log.debug("replay batch committed", extra={"messages": len(batch), "offsets": _show(offsets)})
            self._pace(started, sum(summary.replayed.values()))
        summary.interrupted = not reader.done()

    def _decision(self, m: Message) -> tuple[Decision, str, Headers]:
        headers = cast(Headers, m.headers() or [])
        return decide(headers, self.selection), reason_of(headers), headers

    def _transact(
        self,
        producer: Producer,
        batch: list[Message],
        decisions: list[tuple[Decision, str, Headers]],
        offsets: dict[TP, int],
    ) -> None:
        """One transaction; raises `KafkaException` only for an error that requires an abort. A
        commit that timed out is resumed (`retry_call`), and whatever cannot complete is
        `FatalDeliveryError`: the run ends non-zero and a rerun fences what was left open."""
        try:
            producer.begin_transaction()
        except KafkaException as e:  # local: only a producer in an error state refuses it
            raise FatalDeliveryError(f"begin_transaction failed: {kafka_error(e).str()}") from e
        for i, (m, (decision, reason, headers)) in enumerate(zip(batch, decisions, strict=True)):
            if decision == "replay" and not self._produce(producer, m, replayed_headers(headers)):
                decisions[i] = ("unsendable", reason, headers)
        tps = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
        group = self.consumer.consumer_group_metadata()
        retry_call(lambda: producer.send_offsets_to_transaction(tps, group, CALL_TIMEOUT_S), self._window_s)
        retry_call(lambda: producer.commit_transaction(CALL_TIMEOUT_S), self._window_s)

    def _produce(self, producer: Producer, m: Message, headers: Headers) -> bool:
        """False when the producer refuses this record by itself (too large): retrying the
        transaction could never get it through, so it is skipped and counted."""
        while True:
            try:
                producer.produce(self.selection.target, value=m.value(), key=m.key(), headers=cast(Any, headers))
                return True
            except BufferError as e:  # local queue full: serve delivery reports, then try again
                if self._stop:  # a broker that is away keeps it full: abort, the run ends
                    raise KafkaException(KafkaError(KafkaError._STATE, "stopped with the producer queue full")) from e
                producer.poll(0.05)
            except KafkaException as e:
                err = kafka_error(e)
                if err.code() not in RECORD_REFUSALS:
                    raise FatalDeliveryError(f"produce failed: {err.str()}") from e
                log.warning("dead letter not replayable", extra={"offset": m.offset(), "error": err.str()})
                return False

    def _abort(self, producer: Producer) -> None:
        """Resumed while it times out; an abort that cannot complete ends the run non-zero."""
        try:
            retry_call(lambda: producer.abort_transaction(CALL_TIMEOUT_S), self._window_s)
        except KafkaException as e:
            raise FatalDeliveryError(f"abort_transaction failed: {kafka_error(e).str()}") from e

    def _pace(self, started: float, replayed: int) -> None:
        if self.max_rate:
            ahead_s = replayed / self.max_rate - (time.monotonic() - started)
            if ahead_s > 0:
                time.sleep(ahead_s)


def _combine(a: dict[TP, int], b: dict[TP, int], pick: Callable[[int, int], int]) -> dict[TP, int]:
    return {tp: pick(offset, b.get(tp, offset)) for tp, offset in a.items()}


def _show(offsets: dict[TP, int]) -> dict[str, int]:
    return {f"{t}:{p}": o for (t, p), o in sorted(offsets.items())}
