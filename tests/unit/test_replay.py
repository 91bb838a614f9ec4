"""Replay's pure decisions: which dead letters go back, with which headers, under which group."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.kafka_util import parse_time
from worker.records import Headers
from worker.replay import Selection, decide, reason_of, replay_count, replayed_headers

DEAD: Headers = [
    ("trace-id", b"t1"),
    ("source.system", b"billing"),  # the producer's own header: not one dead-lettering added
    ("replay.count", b"1"),
    ("error.reason", b"schema"),
    ("error.message", b"text: Input should be a valid string"),
    ("source.topic", b"classify.in"),
    ("source.partition", b"2"),
    ("source.offset", b"41"),
    ("route.batch", b"w1:7:3"),
]


def test_replayed_headers_are_the_originals_with_replay_count_incremented() -> None:
    assert replayed_headers(DEAD) == [("trace-id", b"t1"), ("source.system", b"billing"), ("replay.count", b"2")]
    assert replayed_headers([("trace-id", b"t1"), ("error.reason", b"schema")]) == [
        ("trace-id", b"t1"),
        ("replay.count", b"1"),
    ]


@pytest.mark.parametrize(("raw", "count"), [(None, 0), (b"2", 2), (b"junk", 0), (b"-4", 0)])
def test_a_missing_or_malformed_replay_count_reads_as_zero(raw: bytes | None, count: int) -> None:
    headers: Headers = [] if raw is None else [("replay.count", raw)]
    assert replay_count(headers) == count


def test_decide_filters_by_reason_then_stops_at_max_replays() -> None:
    everything = Selection("dlq", "in", max_replays=3)
    assert decide(DEAD, everything) == "replay"
    assert decide(DEAD, Selection("dlq", "in", reasons=frozenset({"too_large"}))) == "filtered"
    assert decide(DEAD, Selection("dlq", "in", reasons=frozenset({"schema"}), max_replays=1)) == "poison"
    assert reason_of([("trace-id", b"x")]) == "unknown"


def test_the_default_group_is_stable_per_selection_and_differs_between_selections() -> None:
    a = Selection("dlq", "in", reasons=frozenset({"schema", "too_large"}))
    assert a.default_group() == Selection("dlq", "in", reasons=frozenset({"too_large", "schema"})).default_group()
    assert a.default_group().startswith("classify-replay-")
    others = [
        Selection("dlq", "in"),
        Selection("dlq", "other", reasons=a.reasons),
        Selection("dlq", "in", reasons=a.reasons, since_ms=1),
    ]
    assert len({a.default_group(), *(s.default_group() for s in others)}) == 4
    assert Selection("dlq", "in", max_replays=5).default_group() == Selection("dlq", "in").default_group()


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1764439200000", 1_764_439_200_000),
        ("2025-11-29T18:00:00Z", 1_764_439_200_000),
        ("2025-11-29T18:00:00", 1_764_439_200_000),
        ("2025-11-29T19:00:00+01:00", 1_764_439_200_000),
    ],
)
def test_parse_time_takes_epoch_ms_or_iso_8601_naive_as_utc(text: str, ms: int) -> None:
    assert parse_time(text) == ms


def test_parse_time_rejects_anything_else_with_a_config_error() -> None:
    with pytest.raises(ConfigError, match="yesterday"):
        parse_time("yesterday")
