"""Routing metrics for a bundle on labelled data, and the threshold choice made on validation.

Numpy only (no torch), so `classify-worker eval` runs on a plain install. Routes are compared,
not just labels: an in-scope query counts as correctly routed when it reaches its category's
topic, an out-of-scope one when it reaches the fallback topic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.model.classifier import Classifier
from worker.routing import Router
from worker.train.data import Example

FALLBACK = "fallback"
#: Thresholds tried on validation: fine enough that the optimum is not missed by more than 0.5%.
THRESHOLD_GRID = np.round(np.arange(0.0, 1.0, 0.005), 3)


@dataclass(frozen=True)
class Scored:
    """Predictions of one model on one labelled set, reusable for several thresholds."""

    gold_labels: list[str]
    gold_routes: np.ndarray  # route name per example ("fallback" or a category)
    top_labels: list[str]
    route_scores: np.ndarray  # what the threshold is compared with: the top category's probability
    label_routes: np.ndarray  # route of the top label, ignoring the threshold
    items_per_s: float


def gold_route(router: Router, label: str, fallback_labels: frozenset[str]) -> str:
    return FALLBACK if label in fallback_labels else router.category_of(label)


def score(classifier: Classifier, router: Router, examples: Sequence[Example]) -> Scored:
    texts = [e.text for e in examples]
    started = time.perf_counter()
    probs = classifier.predict_proba(texts)
    elapsed = time.perf_counter() - started
    fallback_labels = classifier.bundle.routes.fallback_labels
    top = probs.argmax(axis=1)
    labels = [classifier.labels[i] for i in top]
    return Scored(
        gold_labels=[e.label for e in examples],
        gold_routes=np.array([gold_route(router, e.label, fallback_labels) for e in examples]),
        top_labels=labels,
        route_scores=router.category_scores(probs),
        label_routes=np.array([gold_route(router, lb, fallback_labels) for lb in labels]),
        items_per_s=len(texts) / elapsed if elapsed > 0 else float("inf"),
    )


def routes_at(s: Scored, threshold: float) -> np.ndarray:
    return np.where(s.route_scores < threshold, FALLBACK, s.label_routes)


def choose_threshold(s: Scored, oos_weight: float = 1.0) -> float:
    """The threshold maximising routing accuracy; `oos_weight` re-weights out-of-scope examples
    when the validation split holds far fewer of them than production traffic will."""
    weights = np.where(s.gold_routes == FALLBACK, oos_weight, 1.0)
    best, best_acc = 0.0, -1.0
    for t in THRESHOLD_GRID:
        acc = float(((routes_at(s, float(t)) == s.gold_routes) * weights).sum())
        if acc > best_acc + 1e-9:
            best, best_acc = float(t), acc
    return best


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def metrics(s: Scored, threshold: float) -> dict[str, Any]:
    routes = routes_at(s, threshold)
    gold_labels = np.array(s.gold_labels)
    top_labels = np.array(s.top_labels)
    in_scope = s.gold_routes != FALLBACK
    oos = ~in_scope
    per_route = {}
    for route in sorted(set(s.gold_routes) | set(routes)):
        tp = int(((routes == route) & (s.gold_routes == route)).sum())
        fp = int(((routes == route) & (s.gold_routes != route)).sum())
        fn = int(((routes != route) & (s.gold_routes == route)).sum())
        p, r, f = _f1(tp, fp, fn)
        per_route[str(route)] = {"precision": p, "recall": r, "f1": f, "support": int((s.gold_routes == route).sum())}
    label_f1 = [
        _f1(
            int(((top_labels == lb) & (gold_labels == lb)).sum()),
            int(((top_labels == lb) & (gold_labels != lb)).sum()),
            int(((top_labels != lb) & (gold_labels == lb)).sum()),
        )[2]
        for lb in sorted(set(s.gold_labels))
    ]
    return {
        "examples": len(s.gold_labels),
        "in_scope": int(in_scope.sum()),
        "out_of_scope": int(oos.sum()),
        "threshold": threshold,
        "in_scope_accuracy": float((top_labels[in_scope] == gold_labels[in_scope]).mean()) if in_scope.any() else None,
        "out_of_scope_recall": float((routes[oos] == FALLBACK).mean()) if oos.any() else None,
        "routing_accuracy": float((routes == s.gold_routes).mean()),
        "in_scope_routing_accuracy": float((routes[in_scope] == s.gold_routes[in_scope]).mean())
        if in_scope.any()
        else None,
        "macro_f1": float(np.mean(label_f1)),
        "per_route": per_route,
        "items_per_s": s.items_per_s,
    }
