"""W3C Trace Context over Kafka headers: the worker is one hop in a traced request path.

A producer that traces its requests writes a `traceparent` header (and maybe `tracestate`).
Every record the worker writes for that message (routed, fallback, dead letter, shadow
disagreement) carries the same trace id with a new span id: the worker's routing span for the
item, a child of the producer's span. `tracestate` goes along unchanged. Without an inbound
context nothing is added, unless span export is on (`worker.otel`), which starts a trace.

Pure: no SDK import. `Propagator` is what the pipeline calls; `worker.otel` subclasses it to let
the OpenTelemetry sampler decide the sampled flag, and exports the spans from a hook.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from worker.errors import ConfigError
from worker.records import Headers, Outgoing

if TYPE_CHECKING:
    from worker.config import Settings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The one flag of version 00 (W3C Trace Context Level 1): the caller may have recorded its span.
SAMPLED = 0x01

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex only (HEXDIGLC in the spec)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_VERSION_00_LENGTH = 55


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's identity as W3C `traceparent` carries it, plus the `tracestate` that travels with it."""

    trace_id: int
    span_id: int
    flags: int = 0
    state: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> bytes:
        """Always version 00, the only version we can write correctly."""
        return b"00-%032x-%016x-%02x" % (self.trace_id, self.span_id, self.flags & SAMPLED)


def parse_traceparent(value: bytes | str | None) -> TraceContext | None:
    """A `traceparent` value per W3C Trace Context, or None when it is invalid (ignored, as the
    spec requires): version ff, a malformed or upper-case field, an all-zero trace or parent id,
    a version 00 value of any length but 55, or a later version whose 56th character is not '-'
    (later versions may append fields; their first four are read as version 00's)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip(" \t")
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex = m.groups()
    if version == "ff":
        return None
    if version == "00" and len(value) != _VERSION_00_LENGTH:
        return None
    if len(value) > _VERSION_00_LENGTH and value[_VERSION_00_LENGTH] != "-":
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, int(flags_hex, 16))


def extract(headers: Headers) -> TraceContext | None:
    """The inbound context: exactly one valid `traceparent` header (two are ambiguous, so both
    are ignored), with its `tracestate` headers joined as HTTP would join repeated fields."""
    parents = [v for k, v in headers if k == TRACEPARENT]
    if len(parents) != 1:
        return None
    parent = parse_traceparent(parents[0])
    if parent is None:
        return None
    states = [v.decode("ascii", "replace").strip() for k, v in headers if k == TRACESTATE and v]
    state = ",".join(s for s in states if s) or None
    return replace(parent, state=state) if state else parent


def with_context(headers: Headers, context: TraceContext) -> Headers:
    """`headers` with `context` as its only `traceparent` (where the first one was, else last)
    and `tracestate`; every other header kept, in order."""
    ours: Headers = [(TRACEPARENT, context.traceparent())]
    if context.state:
        ours.append((TRACESTATE, context.state.encode("ascii", "replace")))
    out: Headers = []
    for k, v in headers:
        if k == TRACEPARENT:
            out.extend(ours)
            ours = []
        elif k != TRACESTATE:
            out.append((k, v))
    return out + ours


def new_span_id() -> int:
    # random, not secrets: ids must be unique, not secret (OpenTelemetry's own generator does this)
    while True:
        span_id = random.getrandbits(64)
        if span_id:
            return span_id


def new_trace_id() -> int:
    while True:
        trace_id = random.getrandbits(128)
        if trace_id:
            return trace_id


class Propagator:
    """Continues an inbound trace on every record written for it; starts none.

    One routing span per inbound item: its routed (or dead-letter) record and its shadow
    disagreement share the span id. A shadow batch tally stands for a whole batch, not an item,
    and carries no context."""

    def child(self, parent: TraceContext | None) -> TraceContext | None:
        """The worker's span for an item whose inbound context is `parent`; None: write nothing."""
        if parent is None:
            return None
        return TraceContext(parent.trace_id, new_span_id(), parent.flags & SAMPLED, parent.state)

    def stamp(self, outgoing: list[Outgoing]) -> list[Outgoing]:
        """`outgoing` with each item's context on its records; one span per source record, so an
        item's routed record and its shadow disagreement carry the same span id."""
        spans: dict[int, TraceContext | None] = {}
        out = []
        for o in outgoing:
            if o.kind == "shadow" and o.detail == "tally":
                out.append(o)
                continue
            key = id(o.source)
            if key not in spans:
                spans[key] = self.child(extract(o.source.headers))
            span = spans[key]
            out.append(o if span is None else replace(o, headers=with_context(o.headers, span)))
        return out


#: Where the standard OpenTelemetry variables say where spans go; either one turns export on.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def export_requested(env: Mapping[str, str]) -> bool:
    """Span export is off unless the standard variables ask for it: an OTLP endpoint, or an
    explicit `OTEL_TRACES_EXPORTER` other than `none`; `OTEL_SDK_DISABLED=true` wins."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure(settings: Settings) -> Propagator:
    """The worker's propagator: W3C propagation only, or with span export when requested.

    The OTEL_* variables are the OpenTelemetry SDK's own contract (it reads them from the process
    environment itself), so they are not part of `Settings`; this only decides whether to load
    the SDK at all."""
    if not export_requested(os.environ):
        return Propagator()
    try:
        from worker.otel import SpanExport
    except ImportError as e:
        raise ConfigError(
            f"OTEL_* variables ask for span export, which needs: pip install 'classify-worker[otel]' ({e})"
        ) from e
    return SpanExport.from_environment(settings)
