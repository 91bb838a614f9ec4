"""A broker outage makes librdkafka report every reconnect; the log keeps the first line of each
kind per window and says how many copies it dropped."""

from __future__ import annotations

import logging

from worker.observability import RepeatFilter


def _record(
    msg: str, at: float, level: int = logging.WARNING, error: str = "", logger: str = "librdkafka"
) -> logging.LogRecord:
    r = logging.LogRecord(logger, level, __file__, 1, msg, None, None)
    r.created = at
    r.error = error
    return r


def test_repeats_differing_only_in_numbers_are_dropped_then_counted() -> None:
    f = RepeatFilter(window_s=10.0)
    refused = "Connect to ipv4#127.0.0.1:{port} failed: Connection refused (after {ms}ms in state CONNECT)"
    kept = [f.filter(r) for r in (_record(refused.format(port=9092, ms=i), at=100 + i * 0.01) for i in range(640))]
    assert kept.count(True) == 1, "one line per window for 640 reconnect failures"
    later = _record(refused.format(port=9092, ms=3), at=111.0)
    assert f.filter(later) and later.repeated == 639


def test_librdkafka_info_lines_are_thinned_too() -> None:
    f = RepeatFilter(window_s=10.0)
    line = "FAIL [producer-1] b:9093/bootstrap: Disconnected (after {ms}ms in state APIVERSION_QUERY)"
    kept = [f.filter(_record(line.format(ms=i), at=1.0 + i / 10, level=logging.INFO)) for i in range(50)]
    assert kept.count(True) == 1


def test_distinct_warnings_info_and_critical_lines_all_pass() -> None:
    f = RepeatFilter(window_s=10.0)
    assert f.filter(_record("client error", 1.0, error="SASL authentication failed"))
    assert f.filter(_record("client error", 1.1, error="Broker: Topic authorization failed"))
    engine = "worker.engines.confluent"
    assert all(f.filter(_record("batch committed", 1.0 + i / 100, logging.INFO, logger=engine)) for i in range(50))
    waits = [_record("waiting for the broker", 1.0 + i, error="transport failure", logger=engine) for i in range(5)]
    assert all(f.filter(r) for r in waits), "our own backoff lines are already paced: every attempt is logged"
    client = [_record("client error", 3.0 + i / 10, error="Connection refused", logger=engine) for i in range(9)]
    assert [f.filter(r) for r in client].count(True) == 1, "error callbacks are thinned like librdkafka's lines"
    assert all(f.filter(_record("fatal", 2.0 + i / 100, level=logging.CRITICAL)) for i in range(3))
