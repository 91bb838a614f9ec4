"""What trace context costs per routed item: W3C propagation alone (always on) and span export
over OTLP/HTTP (the `otel` extra), measured on the default model's own routed records.

    python -m bench.tracing [--items 20000] [--runs 5]

Each variant stamps the same outcomes (batches of 256 routed records whose inbound messages
carry a `traceparent`, or none) and, with export, runs the hook that builds and queues the spans
and flushes them to an OTLP/HTTP receiver in another process (so the exporter thread's protobuf
encoding and HTTP calls are counted, the receiver's work is not). CPU is this process's, all
threads, per item; compare it with the worker's ~1.25 ms of CPU per routed item (NOTES §7).
Medians of `--runs` passes, variants interleaved. No assertion: read the table (NOTES §11).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from devkit.ports import free_port
from devkit.traffic import OUT_OF_SCOPE, QUERIES
from worker.config import Settings, load_settings
from worker.model.bundle import load_bundle
from worker.otel import SpanExport
from worker.pipeline import Outcome, build_pipeline
from worker.records import Record
from worker.tracing import Propagator

BATCH = 256
RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def outcomes(items: int, traced: bool) -> list[Outcome]:
    """The pipeline's outcomes for `items` queries, stamped by nothing yet (a no-op propagator)."""

    class Nothing(Propagator):
        def stamp(self, outgoing: list) -> list:  # type: ignore[type-arg]
            return outgoing

    pipeline = build_pipeline(load_settings(), shadow=False, tracing=Nothing())
    pool = [q for qs in QUERIES.values() for q in qs] + OUT_OF_SCOPE
    out = []
    for start in range(0, items, BATCH):
        records = []
        for i in range(start, min(items, start + BATCH)):
            headers = [("tenant", b"acme")]
            if traced:
                headers.append(("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode()))
            body = orjson.dumps({"id": str(i), "text": pool[i % len(pool)]})
            records.append(Record(body, str(i).encode(), headers, "classify.in", 0, i))
        out.append(pipeline.process(records))
    return out


def exporter(endpoint: str, sampler: Sampler, settings: Settings) -> SpanExport:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"), max_queue_size=65536)
    provider.add_span_processor(processor)
    export = SpanExport(provider, processor, settings)
    export.on_model(load_bundle(None))
    return export


def cpu_per_item(batches: list[Outcome], tracing: Propagator) -> float:
    """µs of CPU per item to stamp every batch and (with export) report and flush its spans."""
    n = sum(len(b.outgoing) for b in batches)
    started = time.process_time()
    for b in batches:
        stamped = Outcome(tracing.stamp(b.outgoing), b.inference_seconds, b.started_ns)
        if isinstance(tracing, SpanExport):
            tracing.on_batch(stamped)
    if isinstance(tracing, SpanExport):
        assert tracing._processor.force_flush(60_000)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        time.sleep(1)
        settings = Settings()
        endpoint = f"http://127.0.0.1:{port}"
        plain, traced = outcomes(args.items, traced=False), outcomes(args.items, traced=True)
        variants: dict[str, Callable[[], float]] = {
            "no inbound context, export off (default)": lambda: cpu_per_item(plain, Propagator()),
            "inbound traceparent, export off (default)": lambda: cpu_per_item(traced, Propagator()),
            "export on, every item sampled": lambda: cpu_per_item(
                traced, exporter(endpoint, ParentBased(ALWAYS_ON), settings)
            ),
            "export on, 10% sampled (traceidratio)": lambda: cpu_per_item(
                traced, exporter(endpoint, TraceIdRatioBased(0.1), settings)
            ),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, run in variants.items():
                results[name].append(run())
    finally:
        receiver.terminate()
        receiver.wait(10)
    print(f"{args.items} routed items, batches of {BATCH}, {args.runs} runs, pid {os.getpid()}")
    print(f"{'variant':45} {'µs CPU/item (median)':>21} {'min':>7} {'max':>7}")
    for name, values in results.items():
        print(f"{name:45} {statistics.median(values):21.1f} {min(values):7.1f} {max(values):7.1f}")


if __name__ == "__main__":
    main()
