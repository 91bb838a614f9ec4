"""Issue 25, defect 2: records are sized whole (key + value + headers) against the producer's
`message.max.bytes`, and a dead letter that cannot carry its body goes without it, so a poison
message of any size is dead-lettered in its batch instead of failing the transaction."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from tests.support.scenario import sized_inbound
from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.pipeline import RECORD_OVERHEAD_BYTES, Pipeline, build_pipeline, record_bytes
from worker.records import Record

#: librdkafka's default message.max.bytes and the worker's default input limit.
MESSAGE_MAX = 1_000_000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return build_pipeline(load_settings(model={"path": build_bundle(tmp_path_factory.mktemp("s") / "b")}))


def _rec(value: bytes, key: bytes = b"k", headers: list[tuple[str, bytes | None]] | None = None) -> Record:
    return Record(value, key, headers or [("trace", b"t1")], "in", 0, 7)


def test_an_inbound_value_between_the_producer_and_broker_limits_is_dead_lettered_without_its_body(
    pipeline: Pipeline,
) -> None:
    # Given a 1,040,000-byte value: above librdkafka's 1,000,000, below the broker's 1,048,588
    value = sized_inbound(1_040_000)
    (out,) = pipeline.process([_rec(value)]).outgoing
    headers = dict(out.headers)
    # Then it is a too_large dead letter the producer accepts: no body, its size and hash instead
    assert (out.kind, headers["error.reason"], out.value) == ("dead_letter", b"too_large", None)
    assert headers["error.value_bytes"] == b"1040000"
    assert headers["error.value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert out.key == b"k" and headers["trace"] == b"t1", "key and original headers kept when they fit"
    assert record_bytes(out) <= MESSAGE_MAX - RECORD_OVERHEAD_BYTES


def test_headers_count_towards_the_output_limit(tmp_path: Path) -> None:
    # Given a routed value just under the output limit, with 3 KB of headers
    p = build_pipeline(
        load_settings(
            model={"path": build_bundle(tmp_path / "b")},
            limits={"max_input_bytes": 100_000, "max_output_bytes": 10_000},
        )
    )
    value = orjson.dumps({"text": "rain", "meta": {"pad": "z" * 9_500}})
    (out,) = p.process([_rec(value, headers=[("trace", b"t" * 3_000)])]).outgoing
    # Then the whole record is over the limit: dead-lettered (with its body: that still fits)
    assert (out.kind, dict(out.headers)["error.reason"], out.value) == ("dead_letter", b"too_large", value)
    assert b"routed record would be" in dict(out.headers)["error.message"]  # type: ignore[operator]


def test_a_dead_letter_whose_key_and_headers_alone_are_too_large_keeps_only_its_reason_and_source(
    pipeline: Pipeline,
) -> None:
    huge = b"h" * MESSAGE_MAX
    (out,) = pipeline.process([_rec(b"not json", key=huge, headers=[("blob", huge)])]).outgoing
    names = [k for k, _ in out.headers]
    assert (out.value, out.key) == (None, None)
    assert names == [
        "error.reason",
        "error.message",
        "source.topic",
        "source.partition",
        "source.offset",
        "error.value_bytes",
        "error.value_sha256",
    ]
    assert dict(out.headers)["error.reason"] == b"invalid_json"


def test_the_record_limit_follows_the_producers_message_max_bytes(tmp_path: Path) -> None:
    settings = load_settings(
        model={"path": build_bundle(tmp_path / "b")},
        limits={"max_input_bytes": 100_000},
        kafka={"producer_config": {"message.max.bytes": 20_000}},
    )
    p = build_pipeline(settings)
    assert p.max_record_bytes == 20_000 - RECORD_OVERHEAD_BYTES
    (out,) = p.process([_rec(b"{" + b" " * 30_000)]).outgoing
    assert out.value is None and dict(out.headers)["error.reason"] == b"invalid_json"
