"""Hostile input, generated: whatever bytes arrive, the pipeline never raises and turns every
record into exactly one routed or dead-letter record, in order, the dead letter carrying the
original bytes. 200 batches x 25 values = 5,000 generated values per run."""

from __future__ import annotations

import json
from typing import get_args

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.messages import DeadLetterReason, Routed
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Record

MAX_INPUT_BYTES = 50_000
BATCHES = 200
PER_BATCH = 25
REASONS = set(get_args(DeadLetterReason))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    bundle = build_bundle(tmp_path_factory.mktemp("hostile") / "b", max_length=16)
    return build_pipeline(load_settings(model={"path": bundle}, limits={"max_input_bytes": MAX_INPUT_BYTES}))


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


objects = st.fixed_dictionaries(
    {"text": st.text(max_size=200)},
    optional={"id": json_values, "kind": st.sampled_from(["query", "document", "image", 3, None]), "meta": json_values},
).map(_dumps)
wrong_types = st.fixed_dictionaries({}, optional={"text": json_values, "id": json_values, "meta": scalars}).map(_dumps)
deep = st.integers(50, 3000).flatmap(
    lambda n: st.sampled_from(
        [b"[" * n + b"]" * n, b'{"text": "x", "meta": ' + b"[" * n + b"]" * n + b"}", b'{"a":' * n + b"1" + b"}" * n]
    )
)
huge = st.integers(1_000, 200_000).map(lambda n: b'{"text": "' + b"balance " * (n // 8) + b'"}')
surrogates = st.sampled_from(
    [
        b'{"text": "\\ud800"}',
        b'{"text": "\\udfff x"}',
        '{"text": "\ud83d"}'.encode("utf-8", "surrogatepass"),
        b'{"text": "ok \\ud83d\\ude00"}',
    ]
)
duplicate_keys = st.tuples(st.text(max_size=20), json_values).map(
    lambda kv: b'{"text": "rain", "text": ' + _dumps(kv[1]) + b', "id": "a", "id": ' + _dumps(kv[0]) + b"}"
)
boms = st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"]).flatmap(
    lambda bom: st.sampled_from([bom + b'{"text": "wire money"}', bom + b"[]", bom])
)
invalid_utf8 = st.binary(min_size=1, max_size=50).map(lambda b: b'{"text": "' + b + b'\xff"}')
values = st.one_of(
    st.none(),
    st.binary(max_size=300),
    objects,
    wrong_types,
    json_values.map(_dumps),
    deep,
    huge,
    surrogates,
    duplicate_keys,
    boms,
    invalid_utf8,
)


@settings(max_examples=BATCHES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(values, min_size=PER_BATCH, max_size=PER_BATCH))
def test_every_value_becomes_exactly_one_routed_or_dead_letter_record(
    pipeline: Pipeline, batch: list[bytes | None]
) -> None:
    records = [Record(v, b"k%d" % i, [("h", b"v")], "in", 0, i) for i, v in enumerate(batch)]
    outgoing = pipeline.process(records).outgoing  # must not raise
    assert [o.source.offset for o in outgoing] == list(range(len(batch))), "one output per input, in order"
    for value, out in zip(batch, outgoing, strict=True):
        assert out.key == out.source.key and ("h", b"v") in out.headers
        if out.kind == "dead_letter":
            assert out.value == value, "dead letters carry the original bytes"
            assert dict(out.headers)["error.reason"].decode() in REASONS
        else:
            routed = Routed.model_validate(orjson.loads(out.value))
            assert routed.text.strip() and routed.id
            assert value is not None and len(value) <= MAX_INPUT_BYTES
