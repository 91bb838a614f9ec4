"""Trace context end to end on a real broker, with spans to a real OTLP/HTTP receiver: a small
server in this test that decodes what the worker's exporter POSTs with the OpenTelemetry
protobuf definitions (opentelemetry-proto), as a collector would.

A message produced with a `traceparent` comes out with the same trace id and a new span id, and
that span id is the one the receiver gets, a child of the producer's span, linked to a batch
span; the sampler's decision travels in the flags; a message without a context starts a trace."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from devkit.toolkit import read_outputs, start_worker
from tests.support.kafka import NEEDS_FAUST, TopicSet, create_topic, produce
from worker.tracing import parse_traceparent

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
N = 48


@dataclass(frozen=True)
class Received:
    span: Span
    resource: dict[str, Any]


class OtlpReceiver:
    """POST /v1/traces → the spans, decoded; what a collector's OTLP/HTTP receiver accepts."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.requests = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                if ok:
                    request = ExportTraceServiceRequest.FromString(body)
                    with lock:
                        receiver.requests += 1
                        for rs in request.resource_spans:
                            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                            receiver.spans += [Received(s, resource) for ss in rs.scope_spans for s in ss.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def _message(i: int) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """Four kinds of trace context in turn: sampled, unsampled, none, invalid; every 6th malformed."""
    kind = i % 4
    headers = [("seq", str(i).encode())]
    if kind == 0:
        headers += [("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01".encode()), ("tracestate", b"acme=1")]
    elif kind == 1:
        headers += [("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-00".encode())]
    elif kind == 3:
        headers += [("traceparent", f"00-{i + 0xABC000:032X}-{i + 1:016x}-01".encode())]  # upper case: invalid
    value = b'{"text": ' if i % 6 == 5 else json.dumps({"id": f"m{i}", "text": "please wire the rent"}).encode()
    return f"k{i}".encode(), value, headers


def _attrs(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.mark.parametrize(
    "engine",
    [
        "confluent",
        pytest.param("faust", marks=NEEDS_FAUST),
    ],
)
def test_traces_continue_through_the_worker_and_spans_reach_an_otlp_receiver(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path, receiver: OtlpReceiver, engine: str
) -> None:
    # Given messages with a sampled, an unsampled, no and an invalid trace context
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 2)
    produce(kafka_bootstrap, topics.input, [_message(i) for i in range(N)])

    # When a worker with span export on routes them and stops (its exporter flushes at exit)
    env = {
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_METRICS__PORT": "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "router-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    if engine == "faust":
        env["CW_DELIVERY"] = "at_least_once"
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, "--engine", engine, "--max-messages", str(N), "--idle-exit", "15")
    assert worker.wait(120) == 0, log.read_text()[-3000:]
    outputs = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), N, timeout_s=60, quiet_s=1)

    # Then every output carries a context, and the receiver got exactly the sampled items' spans
    by_seq = {int(o.headers["seq"] or b"-1"): o for o in outputs}
    assert sorted(by_seq) == list(range(N)), f"outputs for {sorted(by_seq)}"
    spans = {r.span.span_id: r for r in receiver.spans}
    batches = {sid: r for sid, r in spans.items() if r.span.name == "classify batch"}
    items = {sid: r for sid, r in spans.items() if r.span.name == f"process {topics.input}"}
    assert len(spans) == len(receiver.spans), "a span was exported twice"
    assert batches and sum(_attrs(b.span)["messaging.batch.message_count"] for b in batches.values()) == N
    for b in batches.values():
        a = _attrs(b.span)
        assert a["classify.model"].startswith("tiny-bow@") and a["classify.inference_seconds"] >= 0
    sampled = [i for i in range(N) if i % 4 != 1]
    assert len(items) == len(sampled), f"{len(items)} item spans for {len(sampled)} sampled items"

    for i, out in by_seq.items():
        inbound = parse_traceparent(dict(_message(i)[2]).get("traceparent"))
        ours = parse_traceparent(out.headers.get("traceparent"))
        assert ours is not None, f"item {i}: no traceparent on {out.topic}"
        if i % 4 in (0, 1):  # a valid context: continued, same trace id, new span id, same flag
            assert inbound is not None and ours.trace_id == inbound.trace_id and ours.span_id != inbound.span_id
            assert ours.sampled is (i % 4 == 0), f"item {i}: sampled flag {ours.flags}"
            assert out.headers.get("tracestate") == (b"acme=1" if i % 4 == 0 else None)
        else:  # none, or an invalid one: a new trace, sampled by the default parent-based sampler
            assert ours.trace_id not in (i + 1, i + 0xABC000) and ours.sampled, f"item {i}: {ours}"
        if not ours.sampled:
            assert ours.span_id.to_bytes(8, "big") not in items
            continue
        got = items[ours.span_id.to_bytes(8, "big")]
        span = got.span
        assert span.trace_id == ours.trace_id.to_bytes(16, "big"), f"item {i}: span in another trace"
        assert span.parent_span_id == (inbound.span_id.to_bytes(8, "big") if i % 4 == 0 else b""), f"item {i}"
        assert span.kind == Span.SPAN_KIND_CONSUMER
        assert got.resource["service.name"] == "router-under-test"
        assert [link.span_id for link in span.links] in ([b] for b in batches), f"item {i}: no link to a batch span"
        attrs = _attrs(span)
        assert attrs["messaging.destination.name"] == topics.input and attrs["messaging.kafka.offset"] >= 0
        if i % 6 == 5:
            assert out.topic == topics.dlq and span.status.code == Status.STATUS_CODE_ERROR
            assert attrs["error.type"] == "invalid_json"
        else:
            assert attrs["classify.output_topic"] == out.topic and span.status.code == Status.STATUS_CODE_UNSET
