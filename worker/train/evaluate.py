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
#: Bootstrap resamples behind each 95% interval: with 1,000 the interval ends move by about
#: 0.1 point between seeds on 5,500 examples, a tenth of the interval's width.
BOOTSTRAP_RESAMPLES = 1000
#: The figures `eval`, `train` and the model card lead with, deployed in-scope accuracy first:
#: it is what a user of the worker gets; the argmax one compares with published models.
HEADLINE = (
    ("in_scope_accuracy", "in-scope accuracy, as deployed (right label, not sent to fallback)"),
    ("out_of_scope_recall", "out-of-scope recall (sent to fallback)"),
    ("routing_accuracy", "routing accuracy (category or fallback, all examples)"),
    ("in_scope_accuracy_argmax", "in-scope accuracy, argmax (threshold ignored; as Larson et al.)"),
    ("macro_f1", "macro-F1 (labels, argmax)"),
)


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


def _rate(w: np.ndarray, hit: np.ndarray, among: np.ndarray) -> np.ndarray:
    den = w @ among
    rate: np.ndarray = np.divide(w @ (hit & among), den, out=np.full(len(w), np.nan), where=den > 0)
    return rate


def _figures(s: Scored, routes: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """The headline figures under example weights `w`, one row per weighting: a row of ones
    gives the figures themselves, multinomial counts give a bootstrap resample, so the
    intervals and the point estimates share one definition.

    In-scope accuracy is reported twice: as deployed (the label is right *and* the threshold
    let it through, which is what a user gets) and as argmax (threshold ignored, the figure
    CLINC150's paper reports, to compare with published models)."""
    gold, top = np.array(s.gold_labels), np.array(s.top_labels)
    in_scope = s.gold_routes != FALLBACK
    label_ok = top == gold
    routed_ok = routes == s.gold_routes
    labels = sorted(set(s.gold_labels))
    gold_hot = (gold[:, None] == np.array(labels)[None, :]).astype(np.float64)
    top_hot = (top[:, None] == np.array(labels)[None, :]).astype(np.float64)
    tp, support = w @ (gold_hot * top_hot), w @ gold_hot
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (support + predicted); a label a resample lacks has none
    per_label = np.divide(2 * tp, support + w @ top_hot, out=np.full(tp.shape, np.nan), where=support > 0)
    return {
        "in_scope_accuracy": _rate(w, label_ok & (routes != FALLBACK), in_scope),
        "in_scope_accuracy_argmax": _rate(w, label_ok, in_scope),
        "in_scope_routing_accuracy": _rate(w, routed_ok, in_scope),
        "out_of_scope_recall": _rate(w, routes == FALLBACK, ~in_scope),
        "routing_accuracy": _rate(w, routed_ok, np.ones_like(in_scope)),
        "macro_f1": np.nanmean(per_label, axis=1),
    }


def intervals(
    s: Scored, threshold: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, list[float] | None]:
    """95% percentile-bootstrap interval of each headline figure: resample the examples with
    replacement, recompute, take the 2.5th and 97.5th percentiles."""
    n = len(s.gold_labels)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)
    out: dict[str, list[float] | None] = {}
    for key, values in _figures(s, routes_at(s, threshold), w).items():
        finite = values[~np.isnan(values)]
        out[key] = [float(x) for x in np.percentile(finite, [2.5, 97.5])] if len(finite) else None
    return out


def metrics(s: Scored, threshold: float) -> dict[str, Any]:
    routes = routes_at(s, threshold)
    in_scope = s.gold_routes != FALLBACK
    per_route = {}
    for route in sorted(set(s.gold_routes) | set(routes)):
        tp = int(((routes == route) & (s.gold_routes == route)).sum())
        fp = int(((routes == route) & (s.gold_routes != route)).sum())
        fn = int(((routes != route) & (s.gold_routes == route)).sum())
        p, r, f = _f1(tp, fp, fn)
        per_route[str(route)] = {"precision": p, "recall": r, "f1": f, "support": int((s.gold_routes == route).sum())}
    figures = {
        k: None if np.isnan(v[0]) else float(v[0]) for k, v in _figures(s, routes, np.ones((1, len(routes)))).items()
    }
    return {
        "examples": len(s.gold_labels),
        "in_scope": int(in_scope.sum()),
        "out_of_scope": int((~in_scope).sum()),
        "threshold": threshold,
        **figures,
        "intervals_95": intervals(s, threshold),
        "per_route": per_route,
        "items_per_s": s.items_per_s,
    }
