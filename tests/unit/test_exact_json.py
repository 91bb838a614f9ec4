"""Pass-through fields reach the routed topic as the producer wrote them: integers of any size
stay integers with every digit (orjson alone turns one beyond 64 bits into a float, and cannot
write one back). Property-tested over generated `meta` objects and unknown top-level fields."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Record


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    bundle = build_bundle(tmp_path_factory.mktemp("exact") / "b")
    return build_pipeline(load_settings(model={"path": bundle}))


def _typed(value: object) -> str:
    """One spelling per JSON value *and type*: 18446744073709551616 and 1.8446744073709552e19 differ."""
    return json.dumps(value, sort_keys=True)


big_ints = st.integers(min_value=-(10**300), max_value=10**300) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**40)]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | big_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def _route(pipeline: Pipeline, body: dict) -> dict:
    (out,) = pipeline.process([Record(json.dumps(body).encode(), None, [], "in", 0, 1)]).outgoing
    assert out.kind == "routed", dict(out.headers).get("error.message")
    return json.loads(out.value)  # the standard library keeps integers exact, as a Java or Go reader does


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.dictionaries(st.text(max_size=8), json_values, max_size=5), extra=json_values)
def test_pass_through_fields_come_out_exactly_as_they_went_in(pipeline: Pipeline, meta: dict, extra: object) -> None:
    routed = _route(pipeline, {"text": "wire money", "meta": meta, "tenant": extra})
    assert _typed(routed["meta"]) == _typed(meta)
    assert _typed(routed["tenant"]) == _typed(extra)


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30, -(10**300), 123456789012345678901234567890])
def test_integers_beyond_64_bits_keep_every_digit(pipeline: Pipeline, n: int) -> None:
    routed = _route(pipeline, {"text": "rain", "meta": {"n": n, "nested": [{"n": n}]}, "n": n})
    assert routed["meta"] == {"n": n, "nested": [{"n": n}]} and routed["n"] == n
    assert type(routed["meta"]["n"]) is int


def test_a_number_beyond_a_double_is_dead_lettered_with_the_reason(pipeline: Pipeline) -> None:
    value = b'{"text": "rain", "meta": {"n": 1' + b"0" * 400 + b"}}"
    (out,) = pipeline.process([Record(value, None, [], "in", 0, 1)]).outgoing
    headers = dict(out.headers)
    assert (out.kind, headers["error.reason"], out.value) == ("dead_letter", b"invalid_json", value)
    assert b"number" in headers["error.message"]


def test_digits_inside_strings_are_left_alone(pipeline: Pipeline) -> None:
    body = {"text": "card 4111111111111111111111 rain", "meta": {"card": "4111111111111111111111", "x": 1.5}}
    routed = _route(pipeline, body)
    assert (routed["text"], routed["meta"]) == (body["text"], body["meta"])


def test_nesting_too_deep_to_reread_exactly_is_dead_lettered_not_raised(pipeline: Pipeline) -> None:
    # orjson accepts 1,024 levels; the standard library's re-read of a long integer stops near 1,000
    value = b'{"text": "rain", "meta": ' + b"[" * 1000 + b"12345678901234567890" + b"]" * 1000 + b"}"
    (out,) = pipeline.process([Record(value, None, [], "in", 0, 1)]).outgoing
    assert (out.kind, dict(out.headers)["error.reason"]) == ("dead_letter", b"invalid_json")
