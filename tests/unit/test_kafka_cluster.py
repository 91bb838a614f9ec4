"""devkit.apache_kafka's transaction-coordinator look-up computes the broker's partition choice
(`Utils.abs(transactionalId.hashCode) % partitions`): Java's String.hashCode, reproduced exactly."""

from __future__ import annotations

from devkit.apache_kafka import _java_abs, _java_hash


def test_java_string_hash_code_matches_java() -> None:
    # values printed by Java 17's "…".hashCode()
    assert _java_hash("") == 0
    assert _java_hash("hello") == 99162322
    assert _java_hash("classify-worker-w1") == -815451328
    assert _java_hash("é") == 233  # one UTF-16 code unit
    assert _java_hash("😀") == 1772899  # a surrogate pair: two code units


def test_kafka_abs_maps_min_int_to_zero() -> None:
    assert _java_hash("polygenelubricants") == -(2**31)  # the famous Integer.MIN_VALUE string
    assert _java_abs(-(2**31)) == 0
    assert _java_abs(-5) == 5
