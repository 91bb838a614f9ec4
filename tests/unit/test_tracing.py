"""W3C trace context without a broker: the `traceparent` parser against the spec (examples and a
property test with its own oracle), propagation through the pipeline onto every record an item
yields, and span export (ids, parents, links, sampling) into the SDK's in-memory exporter."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.tiny_model import build_bundle
from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.model.bundle import load_bundle
from worker.otel import SpanExport
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Headers, Outgoing, Record
from worker.tracing import (
    Propagator,
    TraceContext,
    configure,
    export_requested,
    extract,
    parse_traceparent,
    with_context,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, (int(TRACE, 16), int(SPAN, 16), 1)),
        (f"00-{TRACE}-{SPAN}-00", (int(TRACE, 16), int(SPAN, 16), 0)),
        (f"00-{TRACE}-{SPAN}-ff", (int(TRACE, 16), int(SPAN, 16), 0xFF)),  # unknown flags are read, not written
        (VALID.encode(), (int(TRACE, 16), int(SPAN, 16), 1)),
        (f" {VALID}\t", (int(TRACE, 16), int(SPAN, 16), 1)),  # optional whitespace around a header value
        (f"cc-{TRACE}-{SPAN}-01", (int(TRACE, 16), int(SPAN, 16), 1)),  # a later version: first four fields
        (f"cc-{TRACE}-{SPAN}-01-what-the-future-will-be-like", (int(TRACE, 16), int(SPAN, 16), 1)),
    ],
)
def test_valid_traceparents_parse(value: str | bytes, expected: tuple[int, int, int]) -> None:
    got = parse_traceparent(value)
    assert got is not None and (got.trace_id, got.span_id, got.flags) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "no value"),
        ("", "empty"),
        (f"ff-{TRACE}-{SPAN}-01", "version ff is forbidden"),
        (f"00-{TRACE}-{SPAN}-01-extra", "version 00 is exactly 55 characters"),
        (f"cc-{TRACE}-{SPAN}-01.what", "a later version's extra fields start with '-'"),
        (f"00-{TRACE.upper()}-{SPAN}-01", "upper-case hex"),
        (f"00-{'0' * 32}-{SPAN}-01", "all-zero trace id"),
        (f"00-{TRACE}-{'0' * 16}-01", "all-zero parent id"),
        (f"00-{TRACE[:-1]}-{SPAN}-01", "short trace id"),
        (f"00-{TRACE}-{SPAN}1-01", "long parent id"),
        (f"00-{TRACE}-{SPAN}-1", "one-digit flags"),
        (f"0-{TRACE}-{SPAN}-01", "one-digit version"),
        (f"00_{TRACE}_{SPAN}_01", "wrong separator"),
        (f"00-{TRACE}-{SPAN}-0g", "non-hex flags"),
        (b"00-\xff" + VALID[4:].encode(), "not ASCII"),
    ],
)
def test_invalid_traceparents_are_ignored(value: str | bytes | None, why: str) -> None:
    assert parse_traceparent(value) is None, why


def _oracle(value: str) -> tuple[int, int, int] | None:
    """The spec's rules written out differently from the parser: field by field."""
    value = value.strip(" \t")
    hexlc = set("0123456789abcdef")
    fields = value.split("-")
    if len(fields) < 4:
        return None
    version, trace, span, flags = fields[:4]
    widths_ok = [len(version), len(trace), len(span), len(flags)] == [2, 32, 16, 2]
    if not widths_ok or not set(version + trace + span + flags) <= hexlc or version == "ff":
        return None
    if version == "00" and len(fields) != 4:
        return None
    if int(trace, 16) == 0 or int(span, 16) == 0:
        return None
    return int(trace, 16), int(span, 16), int(flags, 16)


def _hex(n: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=n, max_size=n)


@st.composite
def _near(draw: st.DrawFn) -> str:
    """A valid value (any version), then at most one mutation, a tail and whitespace: values
    either side of every rule, about half of them valid."""
    parts = [draw(st.sampled_from(["00", "01", "cc", "ff"])), draw(_hex(32)), draw(_hex(16)), draw(_hex(2))]
    i = draw(st.integers(0, 3))
    mutation = draw(st.sampled_from(["none", "none", "none", "upper", "zero", "shorten", "lengthen", "separator"]))
    if mutation == "upper":
        parts[i] = parts[i].upper()
    elif mutation == "zero":
        parts[i] = "0" * len(parts[i])
    elif mutation == "shorten":
        parts[i] = parts[i][:-1]
    elif mutation == "lengthen":
        parts[i] += draw(st.sampled_from("0aF-"))
    value = "-".join(parts) + draw(st.sampled_from(["", "", "", "-", "-future-fields", ".x", "x"]))
    if mutation == "separator":
        at = [n for n, c in enumerate(value) if c == "-"][min(i, 2)]
        value = value[:at] + draw(st.sampled_from("_ .")) + value[at + 1 :]
    space = draw(st.sampled_from(["", " ", "\t"]))
    return space + value + space


@given(_near())
def test_parser_agrees_with_the_spec_on_near_valid_values(value: str) -> None:
    got = parse_traceparent(value)
    assert (None if got is None else (got.trace_id, got.span_id, got.flags)) == _oracle(value)


@given(st.one_of(st.binary(max_size=80), st.text(max_size=80)))
def test_parser_never_raises(value: bytes | str) -> None:
    parse_traceparent(value)


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans(), st.none() | st.just("vendor=x"))
def test_what_we_write_parses_back(trace_id: int, span_id: int, sampled: bool, state: str | None) -> None:
    context = TraceContext(trace_id, span_id, int(sampled), state)
    back = parse_traceparent(context.traceparent())
    assert back == TraceContext(trace_id, span_id, int(sampled))


def test_extract_needs_exactly_one_valid_traceparent_and_joins_tracestates() -> None:
    headers: Headers = [("traceparent", VALID.encode()), ("tracestate", b"a=1"), ("x", b"y"), ("tracestate", b"b=2")]
    assert extract(headers) == TraceContext(int(TRACE, 16), int(SPAN, 16), 1, "a=1,b=2")
    assert extract([("traceparent", VALID.encode()), ("traceparent", VALID.encode())]) is None, "two are ambiguous"
    assert extract([("traceparent", None)]) is None
    assert extract([("Traceparent", VALID.encode())]) is None, "Kafka header keys are case-sensitive"


def test_with_context_replaces_in_place_and_keeps_every_other_header() -> None:
    new = TraceContext(1, 2, 1, "v=1")
    headers: Headers = [("a", b"1"), ("traceparent", b"junk"), ("tracestate", b"old"), ("b", None)]
    assert with_context(headers, new) == [
        ("a", b"1"),
        ("traceparent", b"00-00000000000000000000000000000001-0000000000000002-01"),
        ("tracestate", b"v=1"),
        ("b", None),
    ]
    appended = (b"traceparent", b"00-00000000000000000000000000000001-0000000000000002-00")
    assert with_context([("a", b"1")], TraceContext(1, 2)) == [("a", b"1"), (appended[0].decode(), appended[1])]


# -- propagation through the pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tracing")
    live = build_bundle(root / "live")
    candidate = build_bundle(root / "candidate", keywords={"wire": "flight", "rain": "oos"}, name="candidate")
    return live, candidate


def _settings(bundles: tuple[Path, Path], shadow: bool) -> Settings:
    live, candidate = bundles
    return load_settings(model={"path": live}, shadow={"model_path": candidate if shadow else None, "topic": "sh"})


def _record(n: int, text: str | None, headers: Headers) -> Record:
    value = b"{" if text is None else orjson.dumps({"id": f"i{n}", "text": text})
    return Record(value, f"k{n}".encode(), headers, "in", 0, n)


def _by_source(outgoing: list[Outgoing]) -> dict[int, list[Outgoing]]:
    out: dict[int, list[Outgoing]] = {}
    for o in outgoing:
        if o.detail != "tally":
            out.setdefault(o.source.offset, []).append(o)
    return out


def test_every_record_of_an_item_continues_its_trace_with_one_new_span(bundles: tuple[Path, Path]) -> None:
    # Given traced items, one of them malformed, two the shadow model routes elsewhere
    pipeline = build_pipeline(_settings(bundles, shadow=True))
    texts = ["my account balance", "please wire the rent", "is rain expected", None]
    parents = [f"00-{n + 1:032x}-{n + 100:016x}-0{n % 2}" for n in range(len(texts))]
    records = [
        _record(n, t, [("a", b"1"), ("traceparent", p.encode()), ("tracestate", b"congo=t61rcWkgMzE")])
        for n, (t, p) in enumerate(zip(texts, parents, strict=True))
    ]

    # When the batch is processed
    by_source = _by_source(pipeline.process(records).outgoing)

    # Then every output (routed, shadow disagreement, dead letter) continues its item's trace
    kinds = sorted(o.kind for outs in by_source.values() for o in outs)
    assert kinds == ["dead_letter", "routed", "routed", "routed", "shadow", "shadow"]
    span_ids = set()
    for n, outs in by_source.items():
        inbound = parse_traceparent(parents[n])
        assert inbound is not None
        contexts = {extract(o.headers) for o in outs}
        assert len(contexts) == 1, f"item {n}: one routing span for all its records, got {contexts}"
        (ours,) = contexts
        assert ours is not None and ours.trace_id == inbound.trace_id, f"item {n}: trace id changed"
        assert ours.span_id != inbound.span_id, f"item {n}: the worker's span id must be new"
        assert ours.flags == inbound.flags & 1 and ours.state == "congo=t61rcWkgMzE"
        for o in outs:
            assert [k for k, _ in o.headers][:3] == ["a", "traceparent", "tracestate"], "header order kept"
        span_ids.add(ours.span_id)
    assert len(span_ids) == len(texts), "each item gets its own span"


def test_without_an_inbound_context_or_with_an_invalid_one_headers_are_untouched(bundles: tuple[Path, Path]) -> None:
    pipeline = build_pipeline(_settings(bundles, shadow=True))
    invalid: Headers = [("traceparent", f"00-{TRACE.upper()}-{SPAN}-01".encode()), ("tracestate", b"a=1")]
    records = [_record(0, "my account balance", [("a", b"1")]), _record(1, "please wire the rent", invalid)]
    for out in pipeline.process(records).outgoing:
        if out.detail != "tally":
            assert [h for h in out.headers if h[0] in ("traceparent", "tracestate")] == [
                h for h in out.source.headers if h[0] in ("traceparent", "tracestate")
            ], f"{out.kind}: headers must pass through unchanged"


def test_the_pipeline_records_when_processing_began(bundles: tuple[Path, Path]) -> None:
    import time

    before = time.time_ns()
    outcome = build_pipeline(_settings(bundles, shadow=False)).process([_record(0, "balance", [])])
    assert before <= outcome.started_ns <= time.time_ns()


# -- span export -----------------------------------------------------------------------------


def _export(bundles: tuple[Path, Path], sampler: object = None) -> tuple[SpanExport, InMemorySpanExporter, Pipeline]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler or ParentBased(ALWAYS_ON), shutdown_on_exit=False)
    processor = SimpleSpanProcessor(memory)
    provider.add_span_processor(processor)
    settings = _settings(bundles, shadow=False)
    export = SpanExport(provider, processor, settings)
    export.on_model(load_bundle(bundles[0]))
    return export, memory, build_pipeline(settings, tracing=export)


def test_one_span_per_item_with_the_ids_in_its_headers_linked_to_a_batch_span(bundles: tuple[Path, Path]) -> None:
    # Given a sampled parent, an unsampled parent, no context and a malformed traced item
    export, memory, pipeline = _export(bundles)
    sampled, unsampled = f"00-{TRACE}-{SPAN}-01", f"00-{'ab' * 16}-{'cd' * 8}-00"
    records = [
        _record(0, "my account balance", [("traceparent", sampled.encode())]),
        _record(1, "is rain expected", [("traceparent", unsampled.encode())]),
        _record(2, "book a flight", []),
        _record(3, None, [("traceparent", f"00-{'12' * 16}-{'34' * 8}-01".encode())]),
    ]

    # When the batch is processed and delivered
    outcome = pipeline.process(records)
    export.on_batch(outcome)

    # Then the outputs carry the sampler's decisions
    ctx = {o.source.offset: extract(o.headers) for o in outcome.outgoing}
    assert all(c is not None for c in ctx.values()), "with export on, every item gets a context"
    assert [c.sampled for c in ctx.values() if c] == [True, False, True, True]
    assert ctx[2] is not None and ctx[2].trace_id not in (int(TRACE, 16), int("ab" * 16, 16)), "a new trace"

    # And one span per sampled item, with exactly the ids written, plus one batch span
    spans = memory.get_finished_spans()
    batch = [s for s in spans if s.name == "classify batch"]
    items = {s.context.span_id: s for s in spans if s.name == "process in"}
    assert len(batch) == 1 and len(items) == 3
    (b,) = batch
    assert b.attributes is not None
    assert b.attributes["messaging.batch.message_count"] == 4
    assert b.attributes["classify.model"] == pipeline.model_id
    assert b.attributes["classify.inference_seconds"] == outcome.inference_seconds
    for offset, parent in [(0, sampled), (2, None), (3, f"00-{'12' * 16}-{'34' * 8}-01")]:
        c = ctx[offset]
        assert c is not None
        span = items[c.span_id]
        assert span.context.trace_id == c.trace_id
        assert span.kind is SpanKind.CONSUMER
        if parent is None:
            assert span.parent is None, "no inbound context: a root span"
        else:
            p = parse_traceparent(parent)
            assert p is not None and span.parent is not None
            assert (span.parent.trace_id, span.parent.span_id) == (p.trace_id, p.span_id)
        assert [link.context.span_id for link in span.links] == [b.context.span_id]
        assert span.start_time == outcome.started_ns and span.end_time is not None
    dead = items[ctx[3].span_id]  # type: ignore[union-attr]
    assert dead.status.status_code is StatusCode.ERROR and dead.attributes["error.type"] == "invalid_json"  # type: ignore[index]
    routed = items[ctx[0].span_id]  # type: ignore[union-attr]
    assert routed.attributes["classify.outcome"] in ("routed", "fallback")  # type: ignore[index]
    assert routed.attributes["messaging.kafka.offset"] == 0  # type: ignore[index]


def test_a_sampler_that_drops_everything_still_propagates_and_exports_nothing(bundles: tuple[Path, Path]) -> None:
    export, memory, pipeline = _export(bundles, sampler=TraceIdRatioBased(0.0))
    outcome = pipeline.process([_record(0, "balance", []), _record(1, "rain", [("traceparent", VALID.encode())])])
    export.on_batch(outcome)
    contexts = [extract(o.headers) for o in outcome.outgoing]
    assert [c is not None and not c.sampled for c in contexts] == [True, True]
    assert contexts[1] is not None and contexts[1].trace_id == int(TRACE, 16)
    assert memory.get_finished_spans() == ()


# -- configuration ---------------------------------------------------------------------------


OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The SDK reads the process environment: start each test from none of its variables."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _configure(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], settings: Settings | None = None) -> Propagator:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return configure(settings or Settings())


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
    ],
)
def test_span_export_is_off_unless_the_standard_variables_ask(
    otel_env: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    assert export_requested(env) is on
    tracing = _configure(otel_env, env)
    assert isinstance(tracing, SpanExport) is on
    assert isinstance(tracing, Propagator)
    if isinstance(tracing, SpanExport):
        tracing.shutdown()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/json"),
    ],
)
def test_an_exporter_we_cannot_run_is_one_clear_config_error(
    otel_env: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace("/", ".")):
        _configure(otel_env, env)


def test_service_name_and_instance_default_to_ours_and_yield_to_the_variables(otel_env: pytest.MonkeyPatch) -> None:
    settings = Settings(kafka={"instance_id": "pod-7"})
    ours = _configure(otel_env, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, settings)
    theirs = _configure(otel_env, {"OTEL_SERVICE_NAME": "router", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, settings)
    assert isinstance(ours, SpanExport) and isinstance(theirs, SpanExport)
    assert ours._resource.attributes["service.name"] == "classify-worker"
    assert ours._resource.attributes["service.instance.id"] == "pod-7"
    assert theirs._resource.attributes["service.name"] == "router" and theirs._resource.attributes["a"] == "b"
    ours.shutdown()
    theirs.shutdown()


def test_the_sampler_comes_from_otel_traces_sampler(otel_env: pytest.MonkeyPatch, bundles: tuple[Path, Path]) -> None:
    tracing = _configure(otel_env, {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"})
    assert isinstance(tracing, SpanExport)
    sampled_parent = parse_traceparent(VALID)
    child = tracing.child(sampled_parent)
    assert child.trace_id == int(TRACE, 16) and not child.sampled, "always_off overrides the parent's flag"
    tracing.shutdown()


def test_a_failing_sampler_keeps_the_parents_flag_and_never_fails_the_batch(bundles: tuple[Path, Path]) -> None:
    class Broken(ParentBased):
        def should_sample(self, *args: object, **kwargs: object) -> NoReturn:
            raise RuntimeError("sampler bug")

    _, _, pipeline = _export(bundles, sampler=Broken(ALWAYS_ON))
    outcome = pipeline.process([_record(0, "balance", [("traceparent", VALID.encode())]), _record(1, "rain", [])])
    assert [extract(o.headers) is not None for o in outcome.outgoing] == [True, True]
    assert [c.sampled for o in outcome.outgoing if (c := extract(o.headers))] == [True, False]
