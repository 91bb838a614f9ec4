"""Records in, outgoing records out: decode + validate → classify → route → encode.

Pure (no Kafka import) so every decision is unit-tested without a broker, and both engines
share it. Each inbound record yields exactly one outgoing record, in input order: routed,
fallback, or dead-letter with the original bytes and a reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from worker.config import Settings
from worker.errors import DecodeError
from worker.messages import (
    ERROR_MESSAGE,
    ERROR_REASON,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    Inbound,
)
from worker.model.bundle import load_bundle
from worker.model.classifier import Classifier, Prediction
from worker.records import Headers, OutcomeKind, Outgoing, Record
from worker.routing import Router

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Outcome:
    outgoing: list[Outgoing]
    inference_seconds: float


@dataclass(frozen=True, slots=True)
class _Valid:
    record: Record
    body: dict[str, Any]
    text: str


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
        obj = orjson.loads(text.removeprefix(_BOM))
    except orjson.JSONDecodeError as e:
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


class Pipeline:
    def __init__(
        self,
        classifier: Classifier,
        router: Router,
        *,
        dlq_topic: str,
        max_input_bytes: int,
        max_output_bytes: int,
    ) -> None:
        self.classifier = classifier
        self.router = router
        self.dlq_topic = dlq_topic
        self.max_input_bytes = max_input_bytes
        self.max_output_bytes = max_output_bytes
        self.model_id = classifier.bundle.model_id

    def process(self, records: list[Record]) -> Outcome:
        """Raises `InferenceError` if the classifier fails on the batch: nothing may be committed."""
        slots: list[Outgoing | None] = []
        valid: list[tuple[int, _Valid]] = []
        for record in records:
            try:
                valid.append((len(slots), decode(record, self.max_input_bytes)))
                slots.append(None)
            except DecodeError as e:
                slots.append(dead_letter(record, self.dlq_topic, e.reason, e.message))
        started = time.perf_counter()
        probs = self.classifier.predict_proba([v.text for _, v in valid])
        inference_seconds = time.perf_counter() - started
        predictions = self.classifier.predictions(probs)
        category_scores = self.router.category_scores(probs).tolist()
        for (slot, item), prediction, category_score in zip(valid, predictions, category_scores, strict=True):
            slots[slot] = self._routed(item, prediction, category_score)
        return Outcome([s for s in slots if s is not None], inference_seconds)

    def _routed(self, item: _Valid, prediction: Prediction, category_score: float) -> Outgoing:
        decision = self.router.route(prediction.label, category_score)
        route: dict[str, Any] = {
            "category": decision.category,
            "category_score": round(category_score, 6),
            "label": prediction.label,
            "score": round(prediction.score, 6),
            "top_k": [{"label": label, "score": round(score, 6)} for label, score in prediction.top_k],
            "model": self.model_id,
            "fallback": decision.fallback,
        }
        if decision.reason:
            route["reason"] = decision.reason
        item.body["route"] = route
        value = orjson.dumps(item.body)
        record = item.record
        if len(value) > self.max_output_bytes:
            return dead_letter(
                record,
                self.dlq_topic,
                "too_large",
                f"routed value would be {len(value)} bytes, over the {self.max_output_bytes}-byte output limit",
            )
        headers: Headers = [
            *record.headers,
            ("route.category", decision.category.encode()),
            ("route.label", prediction.label.encode()),
            ("route.score", f"{prediction.score:.6f}".encode()),
            ("route.model", self.model_id.encode()),
        ]
        kind: OutcomeKind = "fallback" if decision.fallback else "routed"
        return Outgoing(decision.topic, value, record.key, headers, kind, record, decision.category)


def build_pipeline(settings: Settings) -> Pipeline:
    """Load the bundle named by the settings and wire classifier, router and pipeline."""
    bundle = load_bundle(settings.model.path)
    m = settings.model
    classifier = Classifier(bundle, token_budget=m.token_budget, top_k=m.top_k, stride=m.stride, threads=m.threads)
    router = Router(bundle.routes, bundle.labels, settings)
    return Pipeline(
        classifier,
        router,
        dlq_topic=settings.topics.dlq,
        max_input_bytes=settings.limits.max_input_bytes,
        max_output_bytes=settings.limits.max_output_bytes,
    )
