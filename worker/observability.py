"""Metrics, health and logs as hooks the engines call, so neither engine carries metric code.

A hook that raises is logged and never stops processing (`HookSet`). Logs are JSON, one event
per line, and never contain message bodies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.messages import ShadowTally
from worker.model.bundle import Bundle
from worker.pipeline import Outcome
from worker.records import Outgoing

log = logging.getLogger(__name__)

#: Batch sizes are powers of two up to the largest sensible `CW_BATCH__MAX_ITEMS`.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
#: The stages of a message's way through the confluent engine, in order: `wait` (inbound
#: timestamp to the classifier: fetch and queueing), `classify`, `produce` (classifier done to
#: outputs produced), `commit_wait` (produced to its commit's start), `commit`. What follows,
#: until a read_committed reader has it, only a reader sees (`make bench`).
STAGES = ("wait", "classify", "produce", "commit_wait", "commit")
#: Stage buckets: fine enough between 1 ms and 1 s for a p99 read off them (`make bench`).
STAGE_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
)
#: Latency buckets from sub-millisecond inference to multi-second end-to-end under backlog.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Hooks:
    """No-op base: override what you need (dramatiq-middleware style)."""

    def on_model(self, bundle: Bundle) -> None: ...
    def on_loop(self) -> None: ...
    def on_assign(self, partitions: Sequence[tuple[str, int]]) -> None: ...
    def on_revoke(self, partitions: Sequence[tuple[str, int]]) -> None: ...
    def on_batch(self, outcome: Outcome) -> None: ...
    def on_committed(self, outgoing: Sequence[Outgoing], now_ms: int) -> None: ...
    def on_batch_failed(self, stage: str) -> None: ...
    def on_lag(self, topic: str, partition: int, lag: int) -> None: ...
    def on_commit(self, seconds: float) -> None: ...
    def on_stages(self, waits: Sequence[float], spans: Mapping[str, float], messages: int) -> None: ...
    def on_stalled(self) -> None: ...


class HookSet(Hooks):
    """Fans out to several hooks; a failing hook is logged, never raised into the loop."""

    def __init__(self, hooks: Iterable[Hooks]) -> None:
        self._hooks = list(hooks)

    def _call(self, name: str, *args: Any) -> None:
        for hook in self._hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:
                log.exception("hook failed", extra={"hook": type(hook).__name__, "event": name})

    def on_model(self, bundle: Bundle) -> None:
        self._call("on_model", bundle)

    def on_loop(self) -> None:
        self._call("on_loop")

    def on_assign(self, partitions: Sequence[tuple[str, int]]) -> None:
        self._call("on_assign", partitions)

    def on_revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        self._call("on_revoke", partitions)

    def on_batch(self, outcome: Outcome) -> None:
        self._call("on_batch", outcome)

    def on_committed(self, outgoing: Sequence[Outgoing], now_ms: int) -> None:
        self._call("on_committed", outgoing, now_ms)

    def on_batch_failed(self, stage: str) -> None:
        self._call("on_batch_failed", stage)

    def on_lag(self, topic: str, partition: int, lag: int) -> None:
        self._call("on_lag", topic, partition, lag)

    def on_commit(self, seconds: float) -> None:
        self._call("on_commit", seconds)

    def on_stages(self, waits: Sequence[float], spans: Mapping[str, float], messages: int) -> None:
        self._call("on_stages", waits, spans, messages)

    def on_stalled(self) -> None:
        self._call("on_stalled")


class Health(Hooks):
    """`/healthz`: the loop turned recently; `/readyz`: model loaded and partitions assigned."""

    #: A loop that has not turned for this long is stuck (a batch takes well under a second).
    STALE_AFTER_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_loop = time.monotonic()
        self._stalled = False
        self._model = False
        self._assigned: set[tuple[str, int]] = set()

    def on_model(self, bundle: Bundle) -> None:
        self._model = True

    def on_loop(self) -> None:
        self._last_loop = time.monotonic()
        self._stalled = False

    def on_stalled(self) -> None:
        """The engine has had work in hand without progress past its stuck threshold: unhealthy
        now, not `STALE_AFTER_S` later."""
        self._stalled = True

    def on_assign(self, partitions: Sequence[tuple[str, int]]) -> None:
        with self._lock:
            self._assigned |= set(partitions)

    def on_revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        with self._lock:
            self._assigned -= set(partitions)

    def alive(self) -> bool:
        return not self._stalled and time.monotonic() - self._last_loop < self.STALE_AFTER_S

    def ready(self) -> bool:
        with self._lock:
            return self._model and bool(self._assigned) and self.alive()


class PrometheusHooks(Hooks):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("classify_messages", "Inbound messages by outcome.", ["outcome"], registry=registry)
        self.routed = Counter("classify_routed", "Messages routed, by category.", ["category"], registry=registry)
        self.dead_letter = Counter(
            "classify_dead_letter", "Messages dead-lettered, by reason.", ["reason"], registry=registry
        )
        self.batch_size = Histogram(
            "classify_batch_size", "Inbound messages per batch.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.inference = Histogram(
            "classify_inference_seconds", "Classifier time per batch.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.end_to_end = Histogram(
            "classify_end_to_end_seconds",
            "Inbound message timestamp to committed output.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "classify_batch_failures", "Batches retried, by failing stage.", ["stage"], registry=registry
        )
        self.lag = Gauge(
            "classify_consumer_lag",
            "High watermark minus committed offset (the log start where nothing is committed).",
            ["topic", "partition"],
            registry=registry,
        )
        #: Lag is reported (from the housekeeping thread) only for partitions assigned now: a
        #: report computed before a revoke must not bring back the gauge the revoke removed.
        self._lag_lock = threading.Lock()
        self._assigned: set[tuple[str, int]] = set()
        self.commit = Histogram(
            "classify_commit_seconds",
            "Duration of a commit: a transaction's offsets and commit, or an offset commit.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage = Histogram(
            "classify_stage_seconds",
            "Per message, the time spent in each stage up to its commit (see STAGES).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self._stage = {name: self.stage.labels(name) for name in STAGES}
        self.model_info = Gauge("classify_model_info", "The loaded model.", ["model", "version"], registry=registry)
        for outcome in ("routed", "fallback", "dead_letter"):
            self.messages.labels(outcome)
        for stage in ("inference", "delivery"):  # at 0 from the start: rate() and alerts see "none yet"
            self.failures.labels(stage)
        self.shadow_items = Counter(
            "classify_shadow_items", "Items the shadow model scored beside the live one.", registry=registry
        )
        self.shadow_disagreements = Counter(
            "classify_shadow_disagreements",
            "Items the shadow model would have routed elsewhere: live route (from) to shadow route (to).",
            ["from", "to"],
            registry=registry,
        )
        self.shadow_unscored = Counter(
            "classify_shadow_unscored", "Items the shadow model failed on (routing unaffected).", registry=registry
        )

    def on_model(self, bundle: Bundle) -> None:
        self.model_info.labels(bundle.name, bundle.version).set(1)

    def on_batch(self, outcome: Outcome) -> None:
        self.batch_size.observe(sum(1 for out in outcome.outgoing if out.kind != "shadow"))
        self.inference.observe(outcome.inference_seconds)

    def on_committed(self, outgoing: Sequence[Outgoing], now_ms: int) -> None:
        counts: dict[tuple[str, str], int] = {}
        for out in outgoing:
            if out.kind == "shadow":
                self._count_shadow(out)
                continue
            counts[(out.kind, out.detail)] = counts.get((out.kind, out.detail), 0) + 1
            if out.source.timestamp_ms is not None:
                self.end_to_end.observe(max(0, now_ms - out.source.timestamp_ms) / 1000)
        for (kind, detail), n in counts.items():
            self.messages.labels(kind).inc(n)
            if kind == "dead_letter":
                self.dead_letter.labels(detail).inc(n)
            else:  # per output topic: a fallback item counts as "fallback", not its best guess
                self.routed.labels("fallback" if kind == "fallback" else detail).inc(n)

    def _count_shadow(self, out: Outgoing) -> None:
        """From the committed tally records, so the metrics and the shadow topic agree."""
        if out.detail != "tally" or out.value is None:
            return
        tally = ShadowTally.model_validate_json(out.value)
        self.shadow_items.inc(tally.items)
        self.shadow_unscored.inc(tally.unscored)
        for primary, row in tally.routes.items():
            for shadow, n in row.items():
                if shadow != primary:
                    self.shadow_disagreements.labels(primary, shadow).inc(n)

    def on_batch_failed(self, stage: str) -> None:
        self.failures.labels(stage).inc()

    def on_commit(self, seconds: float) -> None:
        self.commit.observe(seconds)

    def on_stages(self, waits: Sequence[float], spans: Mapping[str, float], messages: int) -> None:
        """Per message: a batch's spans count once for each of its messages."""
        wait = self._stage["wait"].observe
        for seconds in waits:
            wait(max(0.0, seconds))
        for name, seconds in spans.items():
            observe = self._stage[name].observe
            for _ in range(messages):
                observe(max(0.0, seconds))

    def on_assign(self, partitions: Sequence[tuple[str, int]]) -> None:
        with self._lag_lock:
            self._assigned |= set(partitions)

    def on_lag(self, topic: str, partition: int, lag: int) -> None:
        with self._lag_lock:
            if (topic, partition) in self._assigned:
                self.lag.labels(topic, str(partition)).set(lag)

    def on_revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        with self._lag_lock:
            self._assigned -= set(partitions)
            for topic, partition in partitions:
                with contextlib.suppress(KeyError):  # never reported for this partition
                    self.lag.remove(topic, str(partition))


class MetricsServer:
    """`/metrics`, `/healthz`, `/readyz` on a daemon thread (stdlib server: three fixed routes)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = _make_handler(registry, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
            elif self.path == "/readyz":
                ok = health.ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not events
            return

    return Handler


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and whatever `extra=` carried."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class RepeatFilter(logging.Filter):
    """Let a repeated warning through once per `window_s`, with how many copies were dropped.

    While a broker is down, librdkafka reports every failed reconnect through both its log and
    error callbacks: about 640 lines per worker in a few seconds of outage, measured on Apache
    Kafka; at a listener speaking another protocol, 216 lines in 25 s. The first line says what
    happened; repeats only bury it. Lines are alike when they match with their numbers (ports,
    durations) masked. Only the clients' reports are thinned: librdkafka's lines at every level
    and the engines' "client error" callbacks."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    #: The Kafka clients' own reports: librdkafka's log lines and the engines' error callbacks.
    THINNED = ("librdkafka", "client error")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        if record.name not in self.THINNED and record.msg not in self.THINNED:
            return True  # our own lines are rate-limited where they are made (backoff), or rare
        key = (record.name, _DIGITS.sub("#", f"{record.getMessage()} {getattr(record, 'error', '')}"))
        last, dropped = self._seen.get(key, (-self.window_s, 0))
        if record.created - last < self.window_s:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > _MAX_KEYS:  # bounded memory under a stream of distinct messages
            self._seen.clear()
        self._seen[key] = (record.created, 0)
        if dropped:
            record.repeated = dropped
        return True


_DIGITS = re.compile(r"\d+")
_MAX_KEYS = 1000


def configure_logging(level: str) -> None:
    """Called by the CLI only; library modules just use `logging.getLogger(__name__)`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
