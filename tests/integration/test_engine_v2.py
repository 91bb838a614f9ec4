"""Engine v2 on a real broker: batch N committed while N+1 is classified, one transaction per
commit interval, the abort of a multi-batch transaction, and a rebalance in mid-interval.
Judged from outside: read_committed (and, where an abort is the point, read_uncommitted)
readers over every output, and the group's committed offsets."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, IsolationLevel, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from devkit.toolkit import end_offsets, partitions, read_outputs
from tests.support import scenario
from tests.support.engine import in_process_engine
from tests.support.kafka import TopicSet, produce
from worker.engines.confluent import ConfluentEngine
from worker.errors import InferenceError
from worker.messages import BATCH_HEADER

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
#: Long enough that only the cap, a revocation or a stop commits a transaction in these tests.
NEVER_MS = 60_000


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[TopicSet]:
    t = TopicSet.fresh()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(t.input, 3, 1)]).values():
        f.result(30)
    yield t


def _valid_only(n: int) -> tuple[list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]], dict]:
    """n well-formed messages: every one reaches the classifier, so call sizes count messages."""
    messages, expected = scenario.build(n + 1, malformed_every=n + 1)  # only message 0 is malformed
    dropped = (messages[0][0] or b"").decode()
    return messages[1:], {k: v for k, v in expected.items() if k != dropped}


def _wrap_classifier(engine: ConfluentEngine, before: Callable[[int, list[str]], None]) -> list[int]:
    """Run `before(call_number, texts)` ahead of each classifier call; returns the call sizes."""
    real = engine.pipeline.classifier.encode
    sizes: list[int] = []

    def wrapped(texts: list[str]) -> object:
        sizes.append(len(texts))
        before(len(sizes), texts)
        return real(texts)

    engine.pipeline.classifier.encode = wrapped  # type: ignore[method-assign]
    return sizes


def _committed_equals_end(bootstrap: str, topics: TopicSet) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": topics.group})
    try:
        ends = end_offsets(bootstrap, [topics.input])
        got = c.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        committed = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in got}
    finally:
        c.close()
    assert committed == ends, f"committed {committed} != end offsets {ends}"


def _no_open_transactions(bootstrap: str, outputs: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    tps = [TopicPartition(t, p) for t, p in partitions(bootstrap, outputs)]
    latest = OffsetSpec.latest()
    hw = admin.list_offsets({tp: latest for tp in tps}, isolation_level=IsolationLevel.READ_UNCOMMITTED)
    lso = admin.list_offsets({tp: latest for tp in tps}, isolation_level=IsolationLevel.READ_COMMITTED)
    stuck = [f"{tp.topic}[{tp.partition}]" for tp in tps if hw[tp].result(30).offset != lso[tp].result(30).offset]
    assert stuck == [], f"transactions left open on {stuck}"


def _read_uncommitted(bootstrap: str, topics: list[str]) -> list[tuple[bytes | None, bytes | None]]:
    """(key, route.batch header) of every output record, aborted ones included."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    tps = partitions(bootstrap, topics)
    c.assign([TopicPartition(t, p, 0) for t, p in tps])
    out, eof, deadline = [], set(), time.monotonic() + 30
    try:
        while len(eof) < len(tps) and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add((m.topic(), m.partition()))
                    continue
                out.append((m.key(), dict(m.headers() or []).get(BATCH_HEADER)))
    finally:
        c.close()
    return out


def _run(engine: ConfluentEngine, **kw: float) -> threading.Thread:
    t = threading.Thread(target=engine.run, kwargs=kw, daemon=True)
    t.start()
    return t


def test_batch_n_is_committed_while_batch_n_plus_1_is_classified(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given an engine of 5-message batches whose second classifier call blocks until released
    engine, _hooks = in_process_engine(
        kafka_bootstrap, topics, tiny_bundle, batch={"max_items": 5, "max_wait_ms": 0}, commit={"interval_ms": 20}
    )
    second_started, release = threading.Event(), threading.Event()

    def block_second(call: int, _texts: list[str]) -> None:
        if call == 2:
            second_started.set()
            assert release.wait(60), "never released"

    sizes = _wrap_classifier(engine, block_second)
    messages, expected = _valid_only(40)
    produce(kafka_bootstrap, topics.input, messages)
    runner = _run(engine, max_messages=len(messages), idle_exit_s=30)
    try:
        # When batch 2 is inside the classifier
        assert second_started.wait(60), "the classifier never got a second batch"
        # Then batch 1 reaches a read_committed reader meanwhile: its transaction did not wait
        early = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=sizes[0], timeout_s=30, quiet_s=0.5)
        assert not release.is_set() and len(early) == sizes[0], f"saw {len(early)} of batch 1's {sizes[0]}"
    finally:
        release.set()
        runner.join(60)
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)
    _committed_equals_end(kafka_bootstrap, topics)


def test_one_transaction_spans_the_micro_batches_of_a_commit_interval(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given 300 messages, micro-batches of at most 8, and transactions capped at 60 messages
    engine, hooks = in_process_engine(
        kafka_bootstrap,
        topics,
        tiny_bundle,
        batch={"max_items": 8},
        commit={"interval_ms": NEVER_MS, "max_items": 60},
    )
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)
    # When the engine drains them
    engine.run(max_messages=300, idle_exit_s=30)
    # Then every id arrived once, and each transaction (route.batch) carried several micro-batches
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)
    per_unit = Counter((r.headers.get(BATCH_HEADER) or b"").decode() for r in received)
    *full, _last = sorted(per_unit, key=lambda unit: int(unit.rsplit(":", 1)[1]))
    assert full and all(per_unit[u] > 8 for u in full), f"a transaction held one micro-batch: {per_unit}"
    assert sum(per_unit.values()) == 300 and len(per_unit) <= 5, per_unit
    counted = next(s.value for s in hooks.batch_size.collect()[0].samples if s.name.endswith("_count"))
    assert counted > len(per_unit), f"{counted} micro-batches counted for {len(per_unit)} transactions"
    _committed_equals_end(kafka_bootstrap, topics)


def test_a_failure_aborts_every_micro_batch_of_the_transaction_and_redoes_them(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given a transaction of several produced micro-batches when the classifier fails once
    engine, hooks = in_process_engine(
        kafka_bootstrap,
        topics,
        tiny_bundle,
        batch={"max_items": 5, "max_wait_ms": 0},
        commit={"interval_ms": NEVER_MS, "max_items": 1000},
    )

    def fail_fifth(call: int, _texts: list[str]) -> None:
        if call == 5:
            deadline = time.monotonic() + 30
            while len(engine.producer) and time.monotonic() < deadline:  # batches 1-4 reach the broker
                time.sleep(0.01)
            raise InferenceError("simulated onnxruntime failure")

    _wrap_classifier(engine, fail_fifth)
    messages, expected = _valid_only(60)
    produce(kafka_bootstrap, topics.input, messages)
    # When the engine runs until all are committed
    engine.run(max_messages=len(messages), idle_exit_s=30)
    # Then read_committed sees every id once; the aborted transaction's outputs exist but stay hidden
    outputs = topics.outputs(CATEGORIES)
    received = read_outputs(kafka_bootstrap, outputs, expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)
    assert hooks.failures.labels("inference")._value.get() == 1
    visible_units = {r.headers.get(BATCH_HEADER) for r in received}
    aborted = Counter(unit for _key, unit in _read_uncommitted(kafka_bootstrap, outputs) if unit not in visible_units)
    assert len(aborted) == 1, f"expected one aborted transaction, found {aborted}"
    assert next(iter(aborted.values())) > 5, f"the aborted transaction held one micro-batch only: {aborted}"
    _committed_equals_end(kafka_bootstrap, topics)
    _no_open_transactions(kafka_bootstrap, outputs)


def test_a_rebalance_mid_interval_commits_the_open_transaction_before_partitions_move(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given engine A holding an open transaction that no interval will commit
    slow = {"batch": {"max_items": 10}, "commit": {"interval_ms": NEVER_MS, "max_items": 100_000}}
    a, _ = in_process_engine(kafka_bootstrap, topics, tiny_bundle, "a", **slow)
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)
    runner_a = _run(a)
    deadline = time.monotonic() + 60
    while not a.delivery.held():
        assert time.monotonic() < deadline, "engine A never opened a transaction"
        time.sleep(0.05)
    held_before = len(a._assigned_now())
    # When engine B joins the group
    b, _ = in_process_engine(kafka_bootstrap, topics, tiny_bundle, "b", **slow)
    runner_b = _run(b)
    try:
        while len(a._assigned_now()) >= held_before:
            assert time.monotonic() < deadline + 60, "no partition moved to engine B"
            time.sleep(0.05)
        # Then A's transaction was committed by the revocation: its outputs are visible now,
        # long before any interval, while both engines still run
        visible = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=1, timeout_s=30, quiet_s=1.0)
        assert len(visible) >= a.processed > 0, f"{len(visible)} visible after A committed {a.processed}"
    finally:
        a.request_stop()
        b.request_stop()
        runner_a.join(60)
        runner_b.join(60)
    # And after both stop, every id is there exactly once, offsets committed, no transaction open
    outputs = topics.outputs(CATEGORIES)
    received = read_outputs(kafka_bootstrap, outputs, expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)
    _committed_equals_end(kafka_bootstrap, topics)
    _no_open_transactions(kafka_bootstrap, outputs)


def test_exactly_once_commits_as_soon_as_nothing_is_in_hand_not_at_the_interval(
    kafka_bootstrap: str, tiny_bundle: Path, topics: TopicSet
) -> None:
    # Given an engine whose commit interval is a minute, running on an empty topic
    engine, hooks = in_process_engine(kafka_bootstrap, topics, tiny_bundle, commit={"interval_ms": NEVER_MS})
    runner = _run(engine, idle_exit_s=60)
    try:
        messages, expected = _valid_only(3)
        for i, message in enumerate(messages):
            # When one message arrives at a time (light load: nothing else in hand)
            produce(kafka_bootstrap, topics.input, [message])
            sent = time.monotonic()
            # Then a read_committed reader has it within seconds, not after the interval
            seen = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=i + 1, timeout_s=30, quiet_s=0.2)
            assert len(seen) == i + 1, f"message {i} not visible after {time.monotonic() - sent:.1f} s"
            assert time.monotonic() - sent < 10, f"message {i} waited {time.monotonic() - sent:.1f} s"
    finally:
        engine.request_stop()
        runner.join(60)
    commits = next(s.value for s in hooks.commit.collect()[0].samples if s.name.endswith("_count"))
    assert commits >= 3, f"{commits} commits for three messages sent one at a time"
    scenario.check(
        read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=3), expected, topics.prefix, topics.dlq
    )
