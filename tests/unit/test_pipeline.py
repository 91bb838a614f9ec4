from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.errors import InferenceError
from worker.messages import Routed
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Record

MAX_IN = 2_000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    bundle = build_bundle(tmp_path_factory.mktemp("p") / "b")
    return build_pipeline(load_settings(model={"path": bundle}, limits={"max_input_bytes": MAX_IN}))


def rec(value: bytes | None, offset: int = 0, key: bytes | None = b"k", headers=None) -> Record:
    return Record(value, key, headers or [("trace", b"t1")], "in", 3, offset, 1_700_000_000_000)


MALFORMED = {
    "null_value": None,
    "too_large": json.dumps({"text": "x" * MAX_IN}).encode(),
    "encoding": b'{"text": "caf\xe9"}',
    "invalid_json": b'{"text": "unterminated',
    "not_an_object": b'["balance"]',
    "schema": b'{"text": 42}',
    "empty_text": b'{"text": "   \\n\\t"}',
}
MORE_SCHEMA = [
    b'{"id": 7, "text": "balance"}',
    b'{"text": "rain", "kind": "image"}',
    b'{"text": "rain", "meta": []}',
    b'{"txt": "balance"}',
    b'{"id": "", "text": "rain"}',
]


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_each_malformed_kind_is_dead_lettered_with_its_reason_and_original_bytes(
    pipeline: Pipeline, reason: str
) -> None:
    value = MALFORMED[reason]
    (out,) = pipeline.process([rec(value, offset=41)]).outgoing
    headers = dict(out.headers)
    assert (out.kind, out.topic, headers["error.reason"]) == ("dead_letter", "classify.dlq", reason.encode())
    assert out.value == value, "dead-lettered value must be the original bytes, unchanged"
    assert out.key == b"k" and headers["trace"] == b"t1"
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == (b"in", b"3", b"41")
    assert headers["error.message"]


@pytest.mark.parametrize("value", MORE_SCHEMA)
def test_contract_violations_are_schema_errors(pipeline: Pipeline, value: bytes) -> None:
    (out,) = pipeline.process([rec(value)]).outgoing
    assert dict(out.headers)["error.reason"] == b"schema"
    assert b"balance" not in dict(out.headers)["error.message"], "error messages must not echo message bodies"


def test_routed_value_is_the_inbound_object_plus_route(pipeline: Pipeline) -> None:
    value = orjson.dumps({"id": "q1", "text": "wire money", "kind": "query", "meta": {"u": 1}, "tenant": "acme"})
    (out,) = pipeline.process([rec(value, key=b"user-9")]).outgoing
    body = orjson.loads(out.value)
    Routed.model_validate(body)
    assert (out.topic, out.kind, out.key) == ("routed.banking", "routed", b"user-9")
    assert {k: body[k] for k in ("id", "text", "kind", "meta", "tenant")} == {
        "id": "q1",
        "text": "wire money",
        "kind": "query",
        "meta": {"u": 1},
        "tenant": "acme",
    }
    route = body["route"]
    assert (route["category"], route["label"], route["fallback"]) == ("banking", "transfer", False)
    assert route["model"] == pipeline.model_id
    headers = dict(out.headers)
    assert headers["trace"] == b"t1"
    assert (headers["route.category"], headers["route.label"]) == (b"banking", b"transfer")
    assert abs(float(headers["route.score"]) - route["score"]) < 1e-5
    assert headers["route.model"] == pipeline.model_id.encode()


def test_missing_id_defaults_to_topic_partition_offset(pipeline: Pipeline) -> None:
    (out,) = pipeline.process([rec(b'{"text": "hotel room"}', offset=77)]).outgoing
    assert orjson.loads(out.value)["id"] == "in:3:77"


def test_utf8_bom_is_tolerated(pipeline: Pipeline) -> None:
    (out,) = pipeline.process([rec(b'\xef\xbb\xbf{"text": "hotel"}')]).outgoing
    assert out.kind == "routed"


def test_out_of_scope_and_low_confidence_go_to_fallback(pipeline: Pipeline) -> None:
    outs = pipeline.process([rec(b'{"text": "tell me a joke"}'), rec(b'{"text": "flight transfer"}', 1)]).outgoing
    bodies = [orjson.loads(o.value)["route"] for o in outs]
    assert [o.topic for o in outs] == ["routed.fallback", "routed.fallback"]
    assert [(b["fallback"], b["reason"]) for b in bodies] == [(True, "fallback_label"), (True, "low_confidence")]
    assert [o.kind for o in outs] == ["fallback", "fallback"]


def test_a_query_torn_between_two_labels_of_one_category_routes_on_the_category_score(pipeline: Pipeline) -> None:
    (out,) = pipeline.process([rec(b'{"text": "flight hotel"}')]).outgoing
    route = orjson.loads(out.value)["route"]
    assert route["score"] < 0.6 <= route["category_score"], route
    assert (out.topic, route["category"], route["fallback"]) == ("routed.travel", "travel", False)


def test_output_over_the_size_limit_is_dead_lettered(tmp_path: Path) -> None:
    p = build_pipeline(
        load_settings(
            model={"path": build_bundle(tmp_path / "b")}, limits={"max_input_bytes": 100_000, "max_output_bytes": 2048}
        )
    )
    value = orjson.dumps({"text": "balance", "meta": {"blob": "z" * 3000}})
    (out,) = p.process([rec(value)]).outgoing
    assert (out.kind, dict(out.headers)["error.reason"], out.value) == ("dead_letter", b"too_large", value)


def test_one_output_per_input_in_input_order(pipeline: Pipeline) -> None:
    values = [b'{"text": "rain"}', b"nope", None, b'{"text": "wire"}', b'{"text": ""}']
    outs = pipeline.process([rec(v, offset=i) for i, v in enumerate(values)]).outgoing
    assert [o.source.offset for o in outs] == [0, 1, 2, 3, 4]
    assert [o.kind for o in outs] == ["routed", "dead_letter", "dead_letter", "routed", "dead_letter"]


def test_classifier_failure_fails_the_whole_batch(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(texts: list[str]) -> object:
        raise InferenceError("simulated")

    monkeypatch.setattr(pipeline.classifier, "predict_proba", boom)
    with pytest.raises(InferenceError):
        pipeline.process([rec(b'{"text": "rain"}')])
