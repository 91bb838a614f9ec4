"""The Kafka toolkit that demo, bench and tests share: a read_committed reader over output
topics, partition and end-offset look-ups."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from worker.records import Headers

#: A reader's fetch wait: librdkafka's 500 ms default would add up to that to every `seen_at`.
READER_FETCH_WAIT_MS = 10


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    seen_at: float  # reader wall clock: when a downstream consumer could act on it
    timestamp_ms: int | None = None  # the message's own timestamp (set by the worker when it produced it)


def read_outputs(
    bootstrap: str,
    topics: list[str],
    expect: int,
    timeout_s: float = 60.0,
    quiet_s: float = 1.0,
    on_message: Callable[[Output], None] | None = None,
    start: dict[tuple[str, int], int] | None = None,
    fetch_wait_ms: int | None = None,
) -> list[Output]:
    """Read every partition of `topics` with read_committed (from `start`, else the beginning)
    until `expect` messages have arrived, then `quiet_s` more so duplicates and strays show up.
    A longer `fetch_wait_ms` costs the broker fewer fetches and delays `seen_at` by up to that."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": READER_FETCH_WAIT_MS,
            **({"fetch.wait.max.ms": fetch_wait_ms} if fetch_wait_ms is not None else {}),
        }
    )
    offsets = start if start is not None else {tp: 0 for tp in partitions(bootstrap, topics)}
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in offsets.items()])
    out: list[Output] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if len(out) >= expect:
                quiet_until = quiet_until or time.monotonic() + quiet_s
                if time.monotonic() > quiet_until:
                    break
            for m in _arrived(consumer):
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reader error: {err.str()}")
                    continue
                ts_type, ts = m.timestamp()
                item = Output(
                    m.topic() or "",
                    m.key(),
                    m.value(),
                    dict(cast(Headers, m.headers() or [])),
                    time.time(),
                    None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                )
                out.append(item)
                if on_message:
                    on_message(item)
    finally:
        consumer.close()
    return out


def _arrived(consumer: Consumer) -> list[Message]:
    """What has arrived, as soon as it has: librdkafka's batch `consume(n, timeout)` waits out
    its whole timeout unless n messages come, which added up to 50 ms to every `seen_at`."""
    first = consumer.poll(0.05)
    return [] if first is None else [first, *consumer.consume(500, 0)]


def partitions(bootstrap: str, topics: list[str]) -> list[tuple[str, int]]:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return [(t, p) for t in topics if t in meta for p in meta[t].partitions]


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """High watermarks now: a reader starting there sees only what is produced from now on."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"offsets-{uuid.uuid4().hex[:8]}"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t, p in partitions(bootstrap, topics)
        }
    finally:
        consumer.close()
