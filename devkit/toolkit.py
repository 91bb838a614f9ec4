"""The Kafka toolkit that demo, bench and tests share: one paced producer, one read_committed
reader over output topics, one way to run a worker subprocess, and partition and end-offset
look-ups."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from worker.records import Headers

#: key, value, headers: what a producer sends, in the order tests and demos build them.
Outbound = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

#: A reader's fetch wait. Tansu holds a fetch for the whole wait, so librdkafka's 500 ms default
#: would add up to that to every `seen_at`; Apache Kafka answers as soon as records or a commit
#: marker arrive (the bench's Kafka reader uses 500: `devkit.bench.KAFKA_READER_FETCH_WAIT_MS`).
READER_FETCH_WAIT_MS = 10


@dataclass
class Sent:
    """What `produce` delivered: each key's send time (wall clock, like Kafka timestamps) and each
    partition's end offset after the last acknowledged message."""

    at: dict[bytes, float] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.at)


def paced(
    rate_per_s: float | None,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[int]:
    """Yield 0, 1, 2, … at a fixed rate (or as fast as the caller goes when the rate is None),
    until `count` items, `duration_s` seconds, or `should_stop()`: every paced producer's loop."""
    started = time.perf_counter()
    i = 0
    while not should_stop() and (count is None or i < count):
        if duration_s is not None and time.perf_counter() - started >= duration_s:
            return
        yield i
        i += 1
        if rate_per_s:
            delay = started + i / rate_per_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[Outbound],
    *,
    rate_per_s: float | None = None,
    duration_s: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    config: Mapping[str, Any] | None = None,
    flush_timeout_s: float = 120.0,
) -> Sent:
    """Send `messages` at a fixed rate (or as fast as the producer goes), for at most `duration_s`:
    every producer of the demo, the bench, sample traffic and the tests. Idempotent, so retries
    across a frozen or restarted broker never duplicate an input; waits out a full local queue;
    raises if any message was not acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True, **(config or {})})
    sent = Sent()
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            partition, offset = msg.partition() or 0, msg.offset() or 0
            sent.ends[partition] = max(sent.ends.get(partition, 0), offset + 1)

    source = iter(messages)
    for _ in paced(rate_per_s, duration_s=duration_s, should_stop=should_stop):
        item = next(source, None)
        if item is None:
            break
        key, value, headers = item
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=cast(Any, headers), on_delivery=on_delivery)
                break
            except BufferError:  # local queue full (or the broker is away): serve reports, retry
                producer.poll(0.05)
        sent.at[key or b""] = time.time()
        producer.poll(0)
    unacked = producer.flush(flush_timeout_s)
    if unacked or errors:
        raise RuntimeError(f"{unacked} messages unacknowledged, {len(errors)} failed: {errors[:3]}")
    return sent


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
    until `expect` messages have arrived and every partition has been read to its end, then
    `quiet_s` more so duplicates and strays show up. (Counting to `expect` alone stopped early
    when duplicates made up the count: at-least-once runs then looked as if they lost records.)
    A longer `fetch_wait_ms` costs the broker fewer fetches and delays `seen_at` by up to that."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": READER_FETCH_WAIT_MS,
            **({"fetch.wait.max.ms": fetch_wait_ms} if fetch_wait_ms is not None else {}),
            "enable.partition.eof": True,
        }
    )
    offsets = start if start is not None else {tp: 0 for tp in partitions(bootstrap, topics)}
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in offsets.items()])
    out: list[Output] = []
    at_end: set[tuple[str, int]] = set()  # partitions read up to their last stable offset
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if len(out) >= expect and at_end >= offsets.keys():
                quiet_until = quiet_until or time.monotonic() + quiet_s
                if time.monotonic() > quiet_until:
                    break
            for m in _arrived(consumer):
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reader error: {err.str()}")
                    at_end.add((m.topic() or "", m.partition() or 0))
                    continue
                at_end.discard((m.topic() or "", m.partition() or 0))
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


def start_cli(env: Mapping[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`classify-worker <args>` as a real subprocess (so it can be killed with -9), its output
    appended to `log_path`, its settings from `env` over this process's environment."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "worker.cli", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )


def start_worker(env: Mapping[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`classify-worker run <args>`: see `start_cli`."""
    return start_cli(env, log_path, "run", *args)


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM (the worker finishes or aborts its batch and leaves the group), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def running_worker(env: Mapping[str, str], log_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(env, log_path, *args)
    try:
        yield proc
    finally:
        stop_worker(proc)
