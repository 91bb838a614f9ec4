"""Spans over OTLP for every routed item (the `otel` extra), configured by the standard
OpenTelemetry variables: `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`,
`OTEL_TRACES_SAMPLER`(`_ARG`), `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_BSP_*`, ...

Two halves, because the pipeline is pure and only committed work should be reported:

- `child` (the pipeline's propagator) picks each item's span id and asks the configured sampler
  whether it is sampled, so the `traceparent` written on the item's records carries the
  decision, and a message without a context starts a trace.
- `on_batch` (a hook; both engines call it once the batch's outputs are committed or
  acknowledged) exports one span per item with exactly the ids written in its headers: a child
  of the producer's span, linked to one span for the batch that carries its size, the model and
  the inference time. Spans are built as SDK `ReadableSpan`s with those ids and handed to a
  `BatchSpanProcessor`, which exports them from its own thread; a full queue drops spans, never
  blocks routing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace import TraceState as OtelTraceState
from opentelemetry.util.types import AttributeValue

from worker import __version__
from worker.config import Settings
from worker.errors import ConfigError
from worker.messages import ROUTE_HEADERS
from worker.model.bundle import Bundle
from worker.observability import Hooks
from worker.pipeline import Outcome
from worker.records import Outgoing
from worker.tracing import SAMPLED, Propagator, TraceContext, extract, new_span_id, new_trace_id

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("classify-worker", __version__)
BATCH_SPAN = "classify batch"
_LABEL, _SCORE = ROUTE_HEADERS[1], ROUTE_HEADERS[2]


class SpanExport(Propagator, Hooks):
    """The propagator that samples and the hook that exports; see the module docstring."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor, settings: Settings) -> None:
        self._provider = provider
        self._sampler: Sampler = provider.sampler
        self._processor = processor
        self._resource = provider.resource
        self._group = settings.kafka.group_id
        self._input = settings.topics.input
        self._model = ""
        self._sampler_failed = False

    @classmethod
    def from_environment(cls, settings: Settings) -> SpanExport:
        """As the SDK reads the OTEL_* variables: from the process environment."""
        env = os.environ
        provider = TracerProvider(resource=_resource(settings, env))  # reads OTEL_TRACES_SAMPLER(_ARG)
        processor = BatchSpanProcessor(_exporter(env))  # reads OTEL_BSP_*
        provider.add_span_processor(processor)  # so the provider flushes it at exit
        log.info(
            "span export on",
            extra={"sampler": provider.sampler.get_description(), "exporter": type(processor.span_exporter).__name__},
        )
        return cls(provider, processor, settings)

    # -- the propagator half: runs in the pipeline ----------------------------------------------

    def child(self, parent: TraceContext | None) -> TraceContext:
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        flags = self._sample(parent, trace_id)
        return TraceContext(trace_id, new_span_id(), flags, parent.state if parent is not None else None)

    def _sample(self, parent: TraceContext | None, trace_id: int) -> int:
        """The sampler's decision as trace flags; a sampler that raises (a custom one) must not
        fail the batch: the parent's flag stands, and it is logged once."""
        try:
            parent_context = _remote(parent) if parent is not None else None
            result = self._sampler.should_sample(parent_context, trace_id, f"process {self._input}", SpanKind.CONSUMER)
        except Exception as e:
            if not self._sampler_failed:
                log.warning("trace sampler failed; keeping the parent's flag", extra={"error": str(e)[:500]})
                self._sampler_failed = True
            return parent.flags & SAMPLED if parent is not None else 0
        return SAMPLED if result.decision is Decision.RECORD_AND_SAMPLE else 0

    # -- the hook half: runs once the batch is delivered -----------------------------------------

    def on_model(self, bundle: Bundle) -> None:
        self._model = bundle.model_id

    def on_batch(self, outcome: Outcome) -> None:
        end_ns = time.time_ns()
        start_ns = outcome.started_ns or end_ns
        items = [o for o in outcome.outgoing if o.kind != "shadow"]
        batch = self._batch_span(outcome, items, start_ns, end_ns)
        for out in items:
            own = extract(out.headers)
            if own is None or not own.sampled:
                continue
            parent = extract(out.source.headers)
            if parent is not None and parent.trace_id != own.trace_id:
                parent = None  # the inbound context was not continued (it was invalid): a root
            self._processor.on_end(self._item_span(out, own, parent, batch, start_ns, end_ns))

    def _batch_span(self, outcome: Outcome, items: list[Outgoing], start_ns: int, end_ns: int) -> SpanContext:
        trace_id = new_trace_id()
        decision = self._sampler.should_sample(None, trace_id, BATCH_SPAN, SpanKind.INTERNAL)
        sampled = decision.decision is Decision.RECORD_AND_SAMPLE
        context = SpanContext(trace_id, new_span_id(), False, TraceFlags(SAMPLED if sampled else 0))
        if sampled:
            counts: dict[str, int] = {}
            for out in items:
                counts[out.kind] = counts.get(out.kind, 0) + 1
            attributes: dict[str, AttributeValue] = {
                "messaging.system": "kafka",
                "messaging.destination.name": self._input,
                "messaging.batch.message_count": len(items),
                "classify.model": self._model,
                "classify.inference_seconds": outcome.inference_seconds,
                **{f"classify.{kind}": n for kind, n in sorted(counts.items())},
            }
            span = ReadableSpan(
                BATCH_SPAN,
                context,
                resource=self._resource,
                attributes=attributes,
                kind=SpanKind.INTERNAL,
                instrumentation_scope=SCOPE,
                start_time=start_ns,
                end_time=end_ns,
            )
            self._processor.on_end(span)
        return context

    def _item_span(
        self,
        out: Outgoing,
        own: TraceContext,
        parent: TraceContext | None,
        batch: SpanContext,
        start_ns: int,
        end_ns: int,
    ) -> ReadableSpan:
        source = out.source
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": source.topic,
            "messaging.destination.partition.id": str(source.partition),
            "messaging.kafka.offset": source.offset,
            "messaging.consumer.group.name": self._group,
            "classify.outcome": out.kind,
            "classify.output_topic": out.topic,
            "classify.model": self._model,
        }
        status = Status(StatusCode.UNSET)
        if out.kind == "dead_letter":
            attributes["error.type"] = out.detail
            status = Status(StatusCode.ERROR, out.detail)
        else:
            headers = dict(out.headers)
            attributes["classify.category"] = out.detail
            attributes["classify.label"] = (headers.get(_LABEL) or b"").decode()
            attributes["classify.score"] = float(headers.get(_SCORE) or 0.0)
        return ReadableSpan(
            f"process {source.topic}",
            _span_context(own, remote=False),
            parent=_span_context(parent, remote=True) if parent is not None else None,
            resource=self._resource,
            attributes=attributes,
            links=[Link(batch)],
            kind=SpanKind.CONSUMER,
            instrumentation_scope=SCOPE,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
        )

    def shutdown(self) -> None:
        """Export what is queued (also done at interpreter exit)."""
        self._provider.shutdown()


def _span_context(context: TraceContext, *, remote: bool) -> SpanContext:
    state = OtelTraceState.from_header([context.state]) if context.state else None
    return SpanContext(context.trace_id, context.span_id, remote, TraceFlags(context.flags & SAMPLED), state)


def _remote(parent: TraceContext) -> Context:
    """The producer's span as the sampler sees it (a parent-based sampler reads its flag)."""
    return set_span_in_context(NonRecordingSpan(_span_context(parent, remote=True)))


def _resource(settings: Settings, env: Mapping[str, str]) -> Resource:
    """The SDK's resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, with our defaults for
    what they leave out: service name, version, and the replica's instance id."""
    given = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    defaults: dict[str, AttributeValue] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in given:
        defaults["service.name"] = "classify-worker"
    if "service.version=" not in given:
        defaults["service.version"] = __version__
    if "service.instance.id=" not in given:
        defaults["service.instance.id"] = settings.kafka.instance_id
    return Resource.create(defaults)


def _exporter(env: Mapping[str, str]) -> SpanExporter:
    """OTLP over HTTP/protobuf (the default protocol), over gRPC with its extra package, or the
    console; one clear line for anything else."""
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    if names == ["console"]:
        return ConsoleSpanExporter()
    if names != ["otlp"]:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={','.join(names)}: the worker exports to one of otlp, console")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip().lower()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as e:
            raise ConfigError("OTLP over gRPC needs: pip install opentelemetry-exporter-otlp-proto-grpc") from e
        exporter: SpanExporter = GrpcSpanExporter()
        return exporter
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: the worker speaks http/protobuf or grpc")
