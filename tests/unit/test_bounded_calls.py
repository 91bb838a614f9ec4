"""The watchdog around blocking librdkafka calls: librdkafka can ignore a transactional call's
timeout when the coordinator goes away (librdkafka#5456); the worker must not hang with it."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from worker.errors import FatalDeliveryError, WedgedClientError
from worker.kafka_util import bounded, retry_call


def test_a_call_that_outlives_its_deadline_is_reported_wedged() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(WedgedClientError, match="did not return within"):
        bounded(release.wait, timeout_s=0.2)
    assert time.monotonic() - started < 2.0, "the watchdog must not wait for the stuck call"
    release.set()


def test_a_prompt_call_returns_and_its_errors_reach_the_caller() -> None:
    bounded(lambda: None, timeout_s=1.0)
    err = KafkaError(KafkaError._STATE, "not in a transaction")
    with pytest.raises(KafkaException) as raised:
        bounded(lambda: (_ for _ in ()).throw(KafkaException(err)), timeout_s=1.0)
    assert raised.value.args[0].code() == KafkaError._STATE


def test_retry_call_retries_retriable_errors_and_stops_on_fatal_ones() -> None:
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))

    ticks: list[int] = []
    retry_call(flaky, timeout_s=5.0, tick=lambda: ticks.append(1))
    assert len(attempts) == 3 and len(ticks) == 3, "liveness is stamped before every attempt"

    def fenced() -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced by a newer producer", fatal=True))

    with pytest.raises(FatalDeliveryError, match="fenced"):
        retry_call(fenced, timeout_s=5.0)


def test_backoff_doubles_to_its_cap_resets_and_stops_waiting_when_told() -> None:
    from worker.kafka_util import Backoff

    backoff = Backoff(start_s=0.5, max_s=3.0)
    assert [backoff.step() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.step() == 0.5
    ticks: list[int] = []
    waiting = Backoff(tick=lambda: ticks.append(1), start_s=5.0)
    started = time.monotonic()
    waiting.wait(should_stop=lambda: len(ticks) >= 3)
    assert time.monotonic() - started < 1.0 and len(ticks) == 3, "a stop request ends the pause at once"
