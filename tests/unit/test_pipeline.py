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

    monkeypatch.setattr(pipeline.classifier, "infer", boom)
    with pytest.raises(InferenceError):
        pipeline.process([rec(b'{"text": "rain"}')])


class _PoisonTokenizer:
    """Stands in for a tokenizer bug: raises a non-`InferenceError` on texts containing `poison`,
    wherever they sit in the batch; counts the calls so bisection's cost is visible."""

    def __init__(self, real: object, exc: type[Exception] = TypeError) -> None:
        self.real = real
        self.exc = exc
        self.calls = 0

    def encode_batch(self, texts: list[str]) -> object:
        self.calls += 1
        if any("poison" in t for t in texts):
            raise self.exc("tokenizer exploded")
        return self.real.encode_batch(texts)  # type: ignore[attr-defined]


@pytest.fixture
def poisoned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Pipeline, _PoisonTokenizer]:
    p = build_pipeline(load_settings(model={"path": build_bundle(tmp_path / "b")}))
    tok = _PoisonTokenizer(p.classifier._tok)
    monkeypatch.setattr(p.classifier, "_tok", tok)
    return p, tok


def test_a_record_that_breaks_the_classifier_alone_is_dead_lettered(
    poisoned: tuple[Pipeline, _PoisonTokenizer],
) -> None:
    p, _ = poisoned
    value = b'{"text": "poison pill"}'
    (out,) = p.process([rec(value, offset=9)]).outgoing
    headers = dict(out.headers)
    assert (out.kind, out.topic, headers["error.reason"]) == ("dead_letter", "classify.dlq", b"inference_error")
    assert out.value == value and headers["source.offset"] == b"9"
    assert b"TypeError" in headers["error.message"] and b"poison" not in headers["error.message"]


def test_a_failing_batch_is_bisected_so_only_the_poison_records_are_dead_lettered(
    poisoned: tuple[Pipeline, _PoisonTokenizer],
) -> None:
    # Given 40 records, two of them poison, the rest routable
    p, tok = poisoned
    texts = ["wire money" if i % 2 else "hotel room" for i in range(40)]
    texts[7], texts[31] = "poison one", "poison two"
    records = [rec(orjson.dumps({"text": t}), offset=i) for i, t in enumerate(texts)]
    # When the batch is processed
    outs = p.process(records).outgoing
    # Then exactly the poison records are dead letters, the rest routed, in input order
    assert [o.source.offset for o in outs] == list(range(40))
    dead = [o.source.offset for o in outs if o.kind == "dead_letter"]
    assert dead == [7, 31], dead
    assert {dict(outs[i].headers)["error.reason"] for i in dead} == {b"inference_error"}
    assert {o.topic for o in outs if o.kind != "dead_letter"} == {"routed.banking", "routed.travel"}
    # And bisection costs O(poison x log n) calls, not one per record
    assert tok.calls <= 2 + 2 * 2 * 6, tok.calls


def test_bisected_results_equal_the_unbroken_classifiers(poisoned: tuple[Pipeline, _PoisonTokenizer]) -> None:
    p, _ = poisoned
    texts = ["wire hotel", "rain rain flight", "poison", "balance account", "tell me a joke"]
    records = [rec(orjson.dumps({"text": t}), offset=i) for i, t in enumerate(texts)]
    bisected = [o.value for o in p.process(records).outgoing if o.kind != "dead_letter"]
    clean = [o.value for o in p.process(records[:2] + records[3:]).outgoing]
    assert bisected == clean, "a text's route must not depend on the batch it was classified in"


def test_a_classifier_that_fails_on_everything_fails_the_batch_instead_of_dead_lettering_it(
    poisoned: tuple[Pipeline, _PoisonTokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a classifier broken for every input, a known-good probe included (not a bad message)
    p, tok = poisoned

    def broken(texts: list[str]) -> object:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(tok, "encode_batch", broken)
    # Then the batch fails as a whole (no commit, retried), and nothing is dead-lettered
    for batch in ([rec(b'{"text": "rain"}')], [rec(b'{"text": "rain"}'), rec(b'{"text": "wire"}', 1)]):
        with pytest.raises(InferenceError, match="RuntimeError"):
            p.process(batch)


def _long_doc_pipeline(tmp_path: Path, **limits: object) -> Pipeline:
    settings = load_settings(
        model={"path": build_bundle(tmp_path / "b", max_length=8), "stride": 2},
        limits={"max_input_bytes": 100_000, "max_chunks": 2, **limits},
    )
    return build_pipeline(settings)


def test_a_document_over_max_chunks_is_routed_on_its_head_and_says_so(tmp_path: Path) -> None:
    # Given a cap of 2 chunks (6 + 5 tokens), a document whose head is about weather, and a short query
    p = _long_doc_pipeline(tmp_path)
    doc = "rain " * 8 + "wire " * 500
    outs = p.process([rec(orjson.dumps({"text": doc, "kind": "document"})), rec(b'{"text": "wire"}', 1)]).outgoing
    long_route, short_route = (orjson.loads(o.value)["route"] for o in outs)
    # Then it is routed on its first 2 chunks, and `route.truncated` says how much was read
    assert (outs[0].topic, long_route["label"]) == ("routed.weather", "weather")
    assert long_route["truncated"]["chunks"] == 2
    assert doc[: long_route["truncated"]["chars"]].split() == ["rain"] * 8 + ["wire"] * 3
    Routed.model_validate(orjson.loads(outs[0].value))
    # And a text within the cap carries no truncation note
    assert "truncated" not in short_route and outs[1].topic == "routed.banking"


def test_a_document_over_max_chunks_is_dead_lettered_when_asked(tmp_path: Path) -> None:
    p = _long_doc_pipeline(tmp_path, over_max_chunks="dead_letter")
    doc = orjson.dumps({"text": "rain " * 8 + "wire " * 500})
    long_out, short_out = p.process([rec(doc, offset=5), rec(b'{"text": "rain"}', 6)]).outgoing
    headers = dict(long_out.headers)
    assert (long_out.kind, headers["error.reason"], long_out.value) == ("dead_letter", b"too_long", doc)
    assert b"CW_LIMITS__MAX_CHUNKS" in headers["error.message"]
    assert short_out.kind == "routed"
