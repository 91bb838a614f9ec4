"""Both engines against a real broker: the same mixed stream through the confluent engine (both
delivery modes) and the Faust engine; a Faust worker killed mid-stream; two confluent workers
sharing one group; metrics (counted after the commit), lag, health and graceful shutdown on
both engines."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.ports import free_port
from devkit.toolkit import read_outputs, start_worker
from tests.support import scenario
from tests.support.kafka import NEEDS_FAUST, TopicSet, create_topic, produce, wait_for_log

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
PARTITIONS = 6


def _env(topics: TopicSet, bootstrap: str, bundle: Path, instance: str, delivery: str) -> dict[str, str]:
    return {
        **topics.env(bootstrap),
        "CW_MODEL__PATH": str(bundle),
        "CW_KAFKA__INSTANCE_ID": instance,
        "CW_DELIVERY": delivery,
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_TOPICS__PARTITIONS": str(PARTITIONS),
        "CW_METRICS__PORT": "0",
    }


def _processed(log: Path) -> int:
    for line in reversed(log.read_text().splitlines()):
        if '"worker stopped"' in line:
            return int(json.loads(line)["processed"])
    raise AssertionError(f"worker did not stop cleanly:\n{log.read_text()[-3000:]}")


ENGINES = [
    pytest.param("confluent", "exactly_once", id="confluent-exactly_once"),
    pytest.param("confluent", "at_least_once", id="confluent-at_least_once"),
    pytest.param(
        "faust",
        "at_least_once",
        id="faust",
        marks=NEEDS_FAUST,
    ),
]


@pytest.mark.parametrize(("engine", "delivery"), ENGINES)
def test_mixed_stream_is_routed_and_dead_lettered(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path, engine: str, delivery: str
) -> None:
    # Given 1,000 messages, 50 of them malformed in 14 different ways, already in the input topic
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    messages, expected = scenario.build(1000)
    produce(kafka_bootstrap, topics.input, messages)

    # When one worker runs until the stream is idle
    log = tmp_path / "worker.log"
    env = _env(topics, kafka_bootstrap, tiny_bundle, "w1", delivery)
    worker = start_worker(env, log, "--engine", engine, "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then every id is on its expected topic exactly once, with key, headers and reason intact
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=delivery == "exactly_once")
    assert _processed(log) == 1000


def test_two_workers_split_the_partitions_and_deliver_exactly_once(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given two workers in one group, both holding partitions
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [
        start_worker(_env(topics, kafka_bootstrap, tiny_bundle, f"w{i}", "exactly_once"), logs[i], "--idle-exit", "8")
        for i in range(2)
    ]
    try:
        for log in logs:
            wait_for_log(log, "partitions assigned")
        wait_for_log(logs[0], "worker starting")
        # When 1,000 messages arrive
        messages, expected = scenario.build(1000)
        produce(kafka_bootstrap, topics.input, messages)
        for w, log in zip(workers, logs, strict=True):
            assert w.wait(120) == 0, log.read_text()[-3000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()

    # Then both did part of the work, and every id arrived exactly once
    counts = [_processed(log) for log in logs]
    assert sum(counts) == 1000 and min(counts) > 0, f"work split {counts}"
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)


def _scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            got = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            if sample.name == name and got == want:
                return sample.value
    return 0.0


def _lag(port: int) -> dict[str, float]:
    """`classify_consumer_lag` per partition, as scraped."""
    _, text = _scrape(port, "/metrics")
    return {
        s.labels["partition"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "classify_consumer_lag"
    }


@pytest.mark.parametrize(("engine", "delivery"), [ENGINES[0], ENGINES[2]])
def test_metrics_count_what_was_routed_and_sigterm_stops_cleanly(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path, engine: str, delivery: str
) -> None:
    # Given a running worker with its metrics server on a known port
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    port = free_port()
    env = {**_env(topics, kafka_bootstrap, tiny_bundle, "m1", delivery), "CW_METRICS__PORT": str(port)}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, "--engine", engine)
    try:
        wait_for_log(log, "partitions assigned")
        # When 1,000 messages are routed
        messages, expected = scenario.build(1000)
        produce(kafka_bootstrap, topics.input, messages)
        received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected), quiet_s=0.5)
        assert len(received) == 1000
        # Then the counters equal what the outputs hold, and the worker is ready
        status, text = _scrape(port, "/metrics")
        assert status == 200
        by_topic = Counter(r.topic for r in received)
        assert _metric(text, "classify_messages_total", outcome="dead_letter") == by_topic[topics.dlq]
        assert _metric(text, "classify_messages_total", outcome="fallback") == by_topic[topics.fallback]
        assert _metric(text, "classify_messages_total", outcome="routed") == sum(
            by_topic[topics.prefix + c] for c in CATEGORIES
        )
        for c in CATEGORIES:
            assert _metric(text, "classify_routed_total", category=c) == by_topic[topics.prefix + c], c
        assert _metric(text, "classify_routed_total", category="fallback") == by_topic[topics.fallback]
        reasons = Counter(e.reason for e in expected.values() if e.reason)
        for reason, n in reasons.items():
            assert _metric(text, "classify_dead_letter_total", reason=reason) == n, reason
        assert _metric(text, "classify_batch_size_count") >= 1
        assert _metric(text, "classify_end_to_end_seconds_count") == 1000
        assert _scrape(port, "/readyz")[0] == 200 and _scrape(port, "/healthz")[0] == 200
        # And the lag of every input partition is reported, down to 0 once all is committed
        deadline = time.monotonic() + 20
        while _lag(port) != {str(p): 0.0 for p in range(PARTITIONS)}:
            assert time.monotonic() < deadline, f"lag {_lag(port)}"
            time.sleep(0.5)
        # And SIGTERM leaves the group and exits 0 within 10 s
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, log.read_text()[-2000:]
        assert time.monotonic() - started < 10
    finally:
        if worker.poll() is None:
            worker.kill()


@NEEDS_FAUST
def test_faust_worker_killed_mid_stream_loses_nothing(kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path) -> None:
    # Given a Faust worker halfway through 3,000 messages
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    messages, expected = scenario.build(3000)
    produce(kafka_bootstrap, topics.input, messages)
    env = {**_env(topics, kafka_bootstrap, tiny_bundle, "f1", "at_least_once"), "CW_BATCH__MAX_ITEMS": "50"}
    log = tmp_path / "faust.log"
    first = start_worker(env, log, "--engine", "faust")
    try:
        reader_topics = topics.outputs(CATEGORIES)
        deadline = time.monotonic() + 90
        while len(read_outputs(kafka_bootstrap, reader_topics, expect=300, timeout_s=5, quiet_s=0)) < 300:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
        # When it is killed with SIGKILL and started again
        first.kill()
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    second = start_worker(env, log, "--engine", "faust", "--idle-exit", "6")
    assert second.wait(180) == 0, log.read_text()[-3000:]

    # Then every id arrived at least once
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)
    dups = len(received) - len({r.key for r in received})
    print(f"faust restart: {len(received)} outputs for {len(expected)} inputs, {dups} re-delivered")
