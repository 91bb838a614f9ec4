"""Small confluent-kafka helpers shared by the engine and the operator tools (`replay`,
`shadow-report`): unwrap a client error, retry a transactional call under a watchdog, and read a
topic up to end offsets fixed at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker.errors import ConfigError, FatalDeliveryError, WedgedClientError

log = logging.getLogger(__name__)

#: Per-call timeout for metadata, offset and transactional calls: far above a healthy round trip.
CALL_TIMEOUT_S = 30.0
#: Both engines' waits for a broker that is down or a classifier that fails: a quick first
#: retry, then no more than one attempt every 30 s.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: Beyond a call's own timeout, how long it may block before the client is declared wedged.
WEDGED_GRACE_S = 10.0
#: Between retries of a call librdkafka marks retriable: short, it usually succeeds on the next try.
RETRY_PAUSE_S = 0.1

TP = tuple[str, int]

#: Produce errors that refuse one record for what it is (its size, its format): a retry of the
#: same record fails the same way, so the record is dead-lettered (or skipped), never retried.
RECORD_REFUSALS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
    }
)


class Backoff:
    """Doubling pauses between retries, from `start_s` up to `max_s`: the one policy of both
    engines, the start-up check and replay. `step` hands out the pause to take now (for async
    callers); `wait` takes it, running `tick` meanwhile (liveness: waiting for a broker that is
    down is correct behaviour, not a stalled loop) and returning early once `should_stop`."""

    def __init__(
        self, tick: Callable[[], None] = lambda: None, start_s: float = BACKOFF_START_S, max_s: float = BACKOFF_MAX_S
    ) -> None:
        self.start_s, self.max_s = start_s, max_s
        self.delay_s = start_s
        self._tick = tick

    def step(self) -> float:
        delay_s = self.delay_s
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return delay_s

    def wait(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + self.step()
        while time.monotonic() < deadline and not should_stop():
            self._tick()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def reset(self) -> None:
        self.delay_s = self.start_s


def kafka_error(e: KafkaException) -> KafkaError:
    """The `KafkaError` inside an exception (librdkafka sometimes raises with a plain string)."""
    err = e.args[0] if e.args else None
    return err if isinstance(err, KafkaError) else KafkaError(KafkaError._FAIL, str(err))


def retry_call(
    fn: Callable[[], Any], timeout_s: float = CALL_TIMEOUT_S, tick: Callable[[], None] = lambda: None
) -> None:
    """Make one transactional call the way librdkafka asks its callers to: call it again while
    the error is retriable, for up to `timeout_s`; `tick` runs before each attempt (the engine
    stamps its liveness there).

    A `commit_transaction` or `abort_transaction` that timed out is *resumable*: librdkafka
    keeps it in progress and answers every other transactional call with "Conflicting
    commit_transaction API call is already in progress" until the same call is made again. So
    a retriable error is never answered with an abort. An error that requires an abort
    (`txn_requires_abort`) is re-raised as the `KafkaException` for the caller to abort on.
    Anything else cannot complete in this process and becomes `FatalDeliveryError`: a fatal
    error (fenced by a newer producer with our transactional id), any other error (librdkafka:
    "treat any other error as fatal"), or a retriable one still failing after `timeout_s` (the
    broker aborts a transaction older than its timeout anyway). The process then exits
    non-zero, and its restart (same transactional id) fences and aborts what was left open."""
    deadline = time.monotonic() + timeout_s
    while True:
        tick()
        try:
            bounded(fn)
            return
        except KafkaException as e:
            err = kafka_error(e)
            if err.fatal():
                raise FatalDeliveryError(f"fatal Kafka error: {err.str()}") from e
            if err.txn_requires_abort():
                raise
            if not err.retriable():
                raise FatalDeliveryError(f"transactional call failed: {err.str()}") from e
            if time.monotonic() > deadline:
                raise FatalDeliveryError(
                    f"transactional call not completed within {timeout_s:.0f} s: {err.str()}"
                ) from e
            time.sleep(RETRY_PAUSE_S)


def bounded(fn: Callable[[], Any], timeout_s: float = CALL_TIMEOUT_S + WEDGED_GRACE_S) -> None:
    """Run a blocking librdkafka call, but give up on it once it outlives its own timeout.

    librdkafka can block in `send_offsets_to_transaction` forever, ignoring its timeout, when
    the group coordinator goes away mid-transaction (confluentinc/librdkafka#5456, #5511): seen
    here when the broker was killed and restarted under the chaos test. A wedged transactional
    producer cannot be repaired in place, so this raises `WedgedClientError`: the process exits,
    and its restart (same transactional id) fences and aborts the open transaction. The call
    runs in a daemon thread, which is left behind blocked and never joined."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # handed over to the caller's thread below
            outcome.append(e)

    thread = threading.Thread(target=call, name="kafka-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise WedgedClientError(f"a Kafka call did not return within {timeout_s:.0f} s; restarting fences it")
    if outcome[0] is not None:
        raise outcome[0]


def topic_partitions(consumer: Consumer, topic: str) -> list[TP]:
    meta = consumer.list_topics(topic, timeout=CALL_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"topic {topic} not found"))
    return [(topic, p) for p in sorted(meta.partitions)]


def watermarks(consumer: Consumer, tps: list[TP]) -> dict[TP, tuple[int, int]]:
    """Low and high watermark of each partition, asked of the broker (not cached)."""
    return {tp: consumer.get_watermark_offsets(TopicPartition(*tp), timeout=CALL_TIMEOUT_S, cached=False) for tp in tps}


def parse_time(text: str) -> int:
    """Milliseconds since the epoch from epoch millis or ISO 8601 (naive means UTC)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-29T18:00:00Z, or epoch ms)") from e
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def offsets_at(consumer: Consumer, tps: list[TP], timestamp_ms: int, high: dict[TP, int]) -> dict[TP, int]:
    """First offset at or after `timestamp_ms` per partition; the high watermark where none is."""
    found = consumer.offsets_for_times([TopicPartition(t, p, timestamp_ms) for t, p in tps], timeout=CALL_TIMEOUT_S)
    return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else high[(tp.topic, tp.partition)] for tp in found}


class BoundedReader:
    """Reads partitions from start offsets up to end offsets fixed beforehand, then is `done`.

    The consumer needs `enable.partition.eof`: read_committed skips transaction markers and
    aborted records, so the last offset before the end may never arrive as a message; the
    end-of-partition event tells where the reader really is."""

    def __init__(self, consumer: Consumer, starts: dict[TP, int], ends: dict[TP, int]) -> None:
        self.consumer = consumer
        self.ends = ends
        self.position = {tp: min(starts[tp], ends[tp]) for tp in ends}
        live = [TopicPartition(t, p, o) for (t, p), o in self.position.items() if o < ends[(t, p)]]
        consumer.assign(live)

    def done(self) -> bool:
        return all(self.position[tp] >= end for tp, end in self.ends.items())

    def take(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to `max_messages` messages below the end offsets; fewer when the window ends."""
        batch = []
        for m in self.consumer.consume(max_messages, timeout_s):
            tp = (m.topic() or "", m.partition() or 0)
            err = m.error()
            if err is not None:
                self._on_error(err, tp, m.offset())
                continue
            offset = m.offset() or 0
            if tp not in self.ends or offset >= self.ends[tp]:
                self.position[tp] = max(self.position.get(tp, 0), self.ends.get(tp, 0))
                continue
            self.position[tp] = offset + 1
            batch.append(m)
        return batch

    def rewind(self, offsets: dict[TP, int]) -> None:
        """Read again from `offsets` (after an aborted transaction)."""
        for tp, offset in offsets.items():
            self.position[tp] = offset
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def _on_error(self, err: KafkaError, tp: TP, offset: int | None) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            if tp in self.position and offset is not None:
                self.position[tp] = max(self.position[tp], offset)
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consume error", extra={"error": err.str(), "code": err.name()})
