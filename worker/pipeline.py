"""Records in, outgoing records out: decode + validate → classify → route → encode.

Pure (no Kafka import) so every decision is unit-tested without a broker, and both engines
share it. Each inbound record yields exactly one outgoing record, in input order: routed,
fallback, or dead-letter with the original bytes and a reason.

With a shadow model (`CW_SHADOW__MODEL_PATH`), the batch's valid items are scored a second time
after routing; its disagreements and one tally per batch are appended as `shadow` records, so
whichever engine commits the batch commits them in the same transaction. Nothing the shadow
computes is read back by routing, and a shadow failure is counted, never raised.

Last, every item's outputs get its trace context (`worker.tracing`): an inbound `traceparent`
continues with the worker's own span id, so both engines propagate traces without knowing it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from worker import exact_json
from worker.config import Settings
from worker.errors import DecodeError, DeliveryError, InferenceError
from worker.messages import (
    ERROR_MESSAGE,
    ERROR_REASON,
    FALLBACK_ROUTE,
    ROUTE_HEADERS,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    VALUE_BYTES,
    VALUE_SHA256,
    Inbound,
    ShadowDisagreement,
    ShadowTally,
    ShadowVerdict,
)
from worker.model.bundle import load_bundle
from worker.model.classifier import Classifier, Encoded, Prediction, Truncation
from worker.records import Headers, OutcomeKind, Outgoing, Record
from worker.routing import Decision, Router
from worker.tracing import Propagator

log = logging.getLogger(__name__)

_BOM = "\ufeff"

#: librdkafka's default `message.max.bytes`: the largest record (key + value + headers) a
#: producer accepts, below the broker's default topic limit (1,048,588).
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
#: Room kept in every record for what the engine adds (the `route.batch` header, ~60 bytes) and
#: librdkafka's per-record framing (varints, attributes), which `message.max.bytes` counts too.
RECORD_OVERHEAD_BYTES = 1024
#: The headers a dead letter without its body keeps when even the original key and headers
#: would not fit: why, and where the original is.
_DEAD_LETTER_HEADERS = frozenset({ERROR_REASON, ERROR_MESSAGE, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET})


@dataclass(frozen=True, slots=True)
class Outcome:
    outgoing: list[Outgoing]
    inference_seconds: float
    #: Wall clock (ns since epoch) when processing began: where the batch's and items' spans start.
    started_ns: int = 0


@dataclass(frozen=True, slots=True)
class _Valid:
    record: Record
    body: dict[str, Any]
    text: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """One model's decision on one item: its prediction, category score and route."""

    prediction: Prediction
    category_score: float
    decision: Decision
    #: set when the text was longer than the classifier reads (`CW_LIMITS__MAX_CHUNKS`)
    truncation: Truncation | None = None
    #: Mahalanobis distance to the nearest in-scope label, when the bundle has a fit
    distance: float | None = None

    @property
    def route(self) -> str:
        """Where the item goes: its category, or `fallback` (what shadow disagreement compares)."""
        return FALLBACK_ROUTE if self.decision.fallback else self.decision.category

    def summary(self, model: str) -> ShadowVerdict:
        p = self.prediction
        return ShadowVerdict(
            model=model,
            route=self.route,
            label=p.label,
            score=round(p.score, 6),
            category_score=round(self.category_score, 6),
        )


def judge(classifier: Classifier, router: Router, texts: list[str]) -> tuple[list[Verdict], float]:
    """Classify and route `texts`; also return the seconds spent in inference."""
    started = time.perf_counter()
    verdicts = verdicts_of(classifier, router, classifier.encode(texts))
    return verdicts, time.perf_counter() - started


def verdicts_of(classifier: Classifier, router: Router, encoded: Encoded) -> list[Verdict]:
    """Inference and routing on already tokenized texts."""
    inference = classifier.infer(encoded)
    predictions = classifier.predictions(inference.probs)
    category_scores = router.category_scores(inference.probs).tolist()
    distances = [None] * len(predictions) if inference.distances is None else inference.distances.tolist()
    return [
        Verdict(p, score, router.route(p.label, score, d), encoded.truncated.get(i), d)
        for i, (p, score, d) in enumerate(zip(predictions, category_scores, distances, strict=True))
    ]


def _schema_message(e: ValidationError) -> str:
    # loc + msg only: the offending input would leak message bodies into headers and logs
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())[:500]


def decode(record: Record, max_input_bytes: int) -> _Valid:
    """Validate one inbound value; raise `DecodeError` with the dead-letter reason code."""
    raw = record.value
    if raw is None:
        raise DecodeError("null_value", "message value is null (tombstone)")
    if len(raw) > max_input_bytes:
        raise DecodeError("too_large", f"value is {len(raw)} bytes, over the {max_input_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("encoding", f"not UTF-8: {e.reason} at byte {e.start}") from e
    try:
        obj = exact_json.loads(text.removeprefix(_BOM))
    except ValueError as e:  # orjson.JSONDecodeError, or nesting too deep to keep an integer exact
        raise DecodeError("invalid_json", str(e)[:500]) from e
    if not isinstance(obj, dict):
        raise DecodeError("not_an_object", f"JSON value is {type(obj).__name__}, expected an object")
    try:
        inbound = Inbound.model_validate(obj)
    except ValidationError as e:
        raise DecodeError("schema", _schema_message(e)) from e
    if not inbound.text.strip():
        raise DecodeError("empty_text", "'text' is empty or whitespace")
    if inbound.id is None:
        obj["id"] = f"{record.topic}:{record.partition}:{record.offset}"
    return _Valid(record, obj, inbound.text)


def record_bytes(out: Outgoing) -> int:
    """What a producer counts against `message.max.bytes`: key + value + header names and values."""
    headers = sum(len(k) + len(v or b"") for k, v in out.headers)
    return len(out.key or b"") + len(out.value or b"") + headers


def fit_dead_letter(out: Outgoing, max_record_bytes: int, keep_body: bool = True) -> Outgoing:
    """A dead letter as it is when it fits (and `keep_body`); else without its body (null value,
    the original value's size and SHA-256 in headers); when even the original key and headers
    are too large, with only the reason and source headers. Whatever its size, a poison message
    is dead-lettered and never blocks its partition."""
    if keep_body and record_bytes(out) <= max_record_bytes:
        return out
    value = out.source.value or b""
    digest = [(VALUE_BYTES, str(len(value)).encode()), (VALUE_SHA256, hashlib.sha256(value).hexdigest().encode())]
    slim = replace(out, value=None, headers=[*out.headers, *digest])
    if record_bytes(slim) <= max_record_bytes:
        return slim
    ours = [(k, v) for k, v in out.headers[len(out.source.headers) :] if k in _DEAD_LETTER_HEADERS]
    return replace(out, value=None, key=None, headers=[*ours, *digest])


def refused_stand_in(out: Outgoing, dlq_topic: str, reason: str, message: str, max_record_bytes: int) -> Outgoing:
    """What replaces an output Kafka refused for what it is (too large, invalid): a dead letter
    of its source without the body, the body's size and SHA-256 in headers. Both engines use it,
    so a refused record costs the same everywhere and never blocks its partition. Raises
    `DeliveryError` when the refused record already was such a dead letter."""
    if out.kind == "dead_letter" and out.value is None:
        raise DeliveryError(f"dead letter refused even without its body: {message}")
    if out.kind != "dead_letter":
        out = dead_letter(out.source, dlq_topic, reason, message)
    return fit_dead_letter(out, max_record_bytes, keep_body=False)


def max_record_bytes(settings: Settings) -> int:
    """The largest record the worker's producer accepts, less the room the engine needs."""
    limit = settings.librdkafka_producer().get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
    return int(limit) - RECORD_OVERHEAD_BYTES


def dead_letter(record: Record, topic: str, reason: str, message: str) -> Outgoing:
    headers: Headers = [
        *record.headers,
        (ERROR_REASON, reason.encode()),
        (ERROR_MESSAGE, message.encode("utf-8", "replace")),
        (SOURCE_TOPIC, record.topic.encode()),
        (SOURCE_PARTITION, str(record.partition).encode()),
        (SOURCE_OFFSET, str(record.offset).encode()),
    ]
    return Outgoing(topic, record.value, record.key, headers, "dead_letter", record, reason)


class Shadow:
    """A candidate bundle scored on the items the primary just routed; see the module docstring."""

    def __init__(self, classifier: Classifier, router: Router, topic: str) -> None:
        self.classifier = classifier
        self.router = router
        self.topic = topic
        self.model_id = classifier.bundle.model_id
        self._failure_logged = False

    def compare(self, items: list[_Valid], primary: list[Verdict], primary_model: str) -> list[Outgoing]:
        """Disagreement records, then the batch's tally; only a tally of unscored items on failure."""
        try:
            theirs, _ = judge(self.classifier, self.router, [item.text for item in items])
        except Exception as e:  # any shadow failure: the batch must still be delivered as routed
            if not self._failure_logged:
                log.warning("shadow model failed; counting unscored items", extra={"error": str(e)[:500]})
                self._failure_logged = True
            return [self._tally(items[0].record, primary_model, {}, unscored=len(items))]
        out: list[Outgoing] = []
        routes: dict[str, dict[str, int]] = {}
        for item, mine, other in zip(items, primary, theirs, strict=True):
            row = routes.setdefault(mine.route, {})
            row[other.route] = row.get(other.route, 0) + 1
            if mine.route != other.route:
                out.append(self._disagreement(item, mine.summary(primary_model), other.summary(self.model_id)))
        out.append(self._tally(items[0].record, primary_model, routes))
        return out

    def _disagreement(self, item: _Valid, primary: ShadowVerdict, shadow: ShadowVerdict) -> Outgoing:
        doc = ShadowDisagreement(id=str(item.body["id"]), primary=primary, shadow=shadow)
        r = item.record
        return Outgoing(self.topic, orjson.dumps(doc.model_dump()), r.key, list(r.headers), "shadow", r, "disagreement")

    def _tally(
        self, source: Record, primary_model: str, routes: dict[str, dict[str, int]], unscored: int = 0
    ) -> Outgoing:
        items = sum(n for row in routes.values() for n in row.values())
        tally = ShadowTally(
            primary_model=primary_model, shadow_model=self.model_id, items=items, unscored=unscored, routes=routes
        )
        # keyless, so tallies spread over the partitions; the batch's first item stands as its source
        return Outgoing(self.topic, orjson.dumps(tally.model_dump()), None, [], "shadow", source, "tally")


class Pipeline:
    def __init__(
        self,
        classifier: Classifier,
        router: Router,
        *,
        dlq_topic: str,
        max_input_bytes: int,
        max_output_bytes: int,
        max_record_bytes: int = DEFAULT_MESSAGE_MAX_BYTES - RECORD_OVERHEAD_BYTES,
        dead_letter_truncated: bool = False,
        shadow: Shadow | None = None,
        tracing: Propagator | None = None,
    ) -> None:
        self.classifier = classifier
        self.router = router
        self.dlq_topic = dlq_topic
        self.max_input_bytes = max_input_bytes
        self.max_output_bytes = max_output_bytes
        #: The hard limit on a whole record (the producer's, lowered by the engine to the
        #: output topics' `max.message.bytes`); `max_output_bytes` is the policy for routed ones.
        self.max_record_bytes = max_record_bytes
        #: `CW_LIMITS__OVER_MAX_CHUNKS=dead_letter`: a text over the chunk cap is refused, not routed on its head
        self.dead_letter_truncated = dead_letter_truncated
        self.shadow = shadow
        self.tracing = tracing or Propagator()
        self.model_id = classifier.bundle.model_id

    def process(self, records: list[Record]) -> Outcome:
        """Raises `InferenceError` if the classifier fails on the batch: nothing may be committed."""
        started_ns = time.time_ns()
        slots: list[Outgoing | None] = []
        valid: list[tuple[int, _Valid]] = []
        for record in records:
            try:
                valid.append((len(slots), decode(record, self.max_input_bytes)))
                slots.append(None)
            except DecodeError as e:
                slots.append(self._dead_letter(record, e.reason, e.message))
        results, inference_seconds = self._classify([item for _, item in valid])
        judged: list[tuple[_Valid, Verdict]] = []
        for (slot, item), result in zip(valid, results, strict=True):
            if isinstance(result, DecodeError):
                slots[slot] = self._dead_letter(item.record, result.reason, result.message)
            else:
                slots[slot] = self._routed(item, result)
                judged.append((item, result))
        outgoing = [s for s in slots if s is not None]
        if self.shadow is not None and judged:
            items, verdicts = zip(*judged, strict=True)
            outgoing += self.shadow.compare(list(items), list(verdicts), self.model_id)
        return Outcome(self.tracing.stamp(outgoing), inference_seconds, started_ns)

    def _classify(self, items: list[_Valid]) -> tuple[list[Verdict | DecodeError], float]:
        """A verdict per item, or the reason it cannot have one.

        An exception other than `InferenceError` (a tokenizer bug, a text some library chokes on)
        is taken for a poison record once the classifier passes a known-good probe: the batch is
        bisected until the records that fail alone are found, and only those are dead-lettered
        (the classifier is batch-independent, so the others get the verdict one call would have
        given them). If the probe fails too, the classifier is broken, not the records: the
        whole batch fails as an `InferenceError` and is retried."""
        try:
            return self._judge(items)
        except InferenceError:
            raise
        except Exception as e:  # anything the tokenizer or a library may raise on one text
            if not self.classifier.healthy():
                raise InferenceError(f"classifier fails on a known-good probe too: {type(e).__name__}") from e
            return self._bisect(items, e)

    def _bisect(self, items: list[_Valid], error: Exception) -> tuple[list[Verdict | DecodeError], float]:
        if len(items) == 1:
            r = items[0].record
            log.warning(
                "record breaks the classifier; dead-lettering it",
                extra={"error": type(error).__name__, "topic": r.topic, "partition": r.partition, "offset": r.offset},
            )
            # the type only: an exception's text may quote the record's body
            return [DecodeError("inference_error", f"the classifier raised {type(error).__name__} on this record")], 0.0
        halves = (items[: len(items) // 2], items[len(items) // 2 :])
        results: list[Verdict | DecodeError] = []
        seconds = 0.0
        for half in halves:
            try:
                part, spent = self._judge(half)
            except InferenceError:
                raise
            except Exception as e:  # this half holds a poison record: split it further
                part, spent = self._bisect(half, e)
            results += part
            seconds += spent
        return results, seconds

    def _judge(self, items: list[_Valid]) -> tuple[list[Verdict | DecodeError], float]:
        started = time.perf_counter()
        encoded = self.classifier.encode([item.text for item in items])
        refused = self._refused(encoded)
        encoded = encoded.without(refused)
        verdicts = iter(verdicts_of(self.classifier, self.router, encoded))
        results = [refused[i] if i in refused else next(verdicts) for i in range(len(items))]
        return results, time.perf_counter() - started

    def _refused(self, encoded: Encoded) -> dict[int, DecodeError]:
        """The texts over the chunk cap, when the settings dead-letter those."""
        if not self.dead_letter_truncated:
            return {}
        limit = f"{self.classifier.max_chunks} chunks of {self.classifier.bundle.max_length} tokens"
        message = f"text is longer than {limit} (CW_LIMITS__MAX_CHUNKS)"
        return {i: DecodeError("too_long", message) for i in encoded.truncated}

    def _dead_letter(self, record: Record, reason: str, message: str) -> Outgoing:
        return fit_dead_letter(dead_letter(record, self.dlq_topic, reason, message), self.max_record_bytes)

    def _routed(self, item: _Valid, verdict: Verdict) -> Outgoing:
        prediction, category_score, decision = verdict.prediction, verdict.category_score, verdict.decision
        route: dict[str, Any] = {
            "category": decision.category,
            "category_score": round(category_score, 6),
            "label": prediction.label,
            "score": round(prediction.score, 6),
            "top_k": [{"label": label, "score": round(score, 6)} for label, score in prediction.top_k],
            "model": self.model_id,
            "fallback": decision.fallback,
        }
        if verdict.distance is not None:
            route["distance"] = round(verdict.distance, 6)
        if decision.reason:
            route["reason"] = decision.reason
        if verdict.truncation is not None:
            route["truncated"] = {"chunks": verdict.truncation.chunks, "chars": verdict.truncation.chars}
        item.body["route"] = route
        value = exact_json.dumps(item.body)
        record = item.record
        values = (decision.category, prediction.label, f"{prediction.score:.6f}", self.model_id)
        headers: Headers = [*record.headers, *((k, v.encode()) for k, v in zip(ROUTE_HEADERS, values, strict=True))]
        kind: OutcomeKind = "fallback" if decision.fallback else "routed"
        out = Outgoing(decision.topic, value, record.key, headers, kind, record, decision.category)
        limit = min(self.max_output_bytes, self.max_record_bytes)
        if (size := record_bytes(out)) > limit:  # key and headers count too
            return self._dead_letter(
                record, "too_large", f"routed record would be {size} bytes, over the {limit}-byte output limit"
            )
        return out


def build_pipeline(settings: Settings, *, shadow: bool = True, tracing: Propagator | None = None) -> Pipeline:
    """Load the bundle named by the settings (and the shadow bundle, if any and `shadow`) and wire
    classifier, router and pipeline; `tracing` decides the trace context of what is written."""
    classifier, router = _load(settings, settings.model.path)
    candidate = None
    if shadow and settings.shadow.model_path is not None:
        candidate = Shadow(*_load(settings, settings.shadow.model_path), settings.shadow.topic)
    return Pipeline(
        classifier,
        router,
        dlq_topic=settings.topics.dlq,
        max_input_bytes=settings.limits.max_input_bytes,
        max_output_bytes=settings.limits.max_output_bytes,
        max_record_bytes=max_record_bytes(settings),
        dead_letter_truncated=settings.limits.over_max_chunks == "dead_letter",
        shadow=candidate,
        tracing=tracing,
    )


def _load(settings: Settings, path: Path | None) -> tuple[Classifier, Router]:
    """A classifier and its router; a shadow bundle is routed with the same settings as the live one."""
    bundle = load_bundle(path)
    m = settings.model
    classifier = Classifier(
        bundle,
        token_budget=m.token_budget,
        top_k=m.top_k,
        stride=m.stride,
        threads=m.threads,
        max_chunks=settings.limits.max_chunks,
    )
    return classifier, Router(bundle.routes, bundle.labels, settings)
