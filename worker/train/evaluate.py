"""Routing metrics for a bundle on labelled data, and the out-of-scope score and threshold
chosen on validation.

Numpy only (no torch), so `classify-worker eval` runs on a plain install. Routes are compared,
not just labels: an in-scope query counts as correctly routed when it reaches its category's
topic, an out-of-scope one when it reaches the fallback topic.

Out-of-scope detection is also reported threshold-free, for each score the bundle has: AUROC and
the false-positive rate at 95% true-positive rate, where the *positive* class is in scope (an
in-scope query kept is a true positive, an out-of-scope query kept a false positive). FPR@95 is
then the share of out-of-scope queries still routed when the threshold keeps 95% of in-scope ones.
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
#: Distance thresholds tried: these quantiles of the validation distances (the same 0.5% steps).
DISTANCE_QUANTILES = np.arange(0.5, 100.0, 0.5)
#: The true-positive (in-scope kept) rate at which the false-positive rate is read.
TPR_TARGET = 0.95
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
#: Threshold-free out-of-scope detection, per score (`Scored.in_scope_scores`): metric key prefix
#: and label. Positive class: in scope.
DETECTION = (
    ("auroc", "out-of-scope AUROC (in scope = positive)"),
    ("fpr_at_95_tpr", "FPR at 95% TPR (out-of-scope kept when 95% of in-scope is)"),
)


def detection_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric key, label) of each detection figure present in metrics `m`, score by score."""
    return [
        (f"{key}_{name}", f"{label}, {name} score")
        for name in ("softmax", "mahalanobis")
        for key, label in DETECTION
        if f"{key}_{name}" in m
    ]


@dataclass(frozen=True)
class Scored:
    """Predictions of one model on one labelled set, reusable for several thresholds."""

    gold_labels: list[str]
    gold_routes: np.ndarray  # route name per example ("fallback" or a category)
    top_labels: list[str]
    route_scores: np.ndarray  # what the threshold is compared with: the top category's probability
    label_routes: np.ndarray  # route of the top label, ignoring the threshold
    items_per_s: float
    #: whether the top label is a fallback label (such an item falls back whatever its scores)
    fallback_top: np.ndarray | None = None
    #: Mahalanobis distance to the nearest in-scope label, when the bundle has a fit
    distances: np.ndarray | None = None

    def in_scope_scores(self) -> dict[str, np.ndarray]:
        """Each out-of-scope score as a number that is higher the more in scope an item looks.
        `softmax`: the top category's probability, minus 1 when the top label is a fallback label
        (those rank below every other, as they fall back at any threshold), so thresholding it at
        t ≥ 0 is the deployed category rule. `mahalanobis`: minus the distance."""
        fallback_top = self.fallback_top if self.fallback_top is not None else np.zeros(len(self.route_scores), bool)
        scores = {"softmax": self.route_scores.astype(np.float64) - fallback_top}
        if self.distances is not None:
            scores["mahalanobis"] = -self.distances.astype(np.float64)
        return scores


def gold_route(router: Router, label: str, fallback_labels: frozenset[str]) -> str:
    return FALLBACK if label in fallback_labels else router.category_of(label)


def score(classifier: Classifier, router: Router, examples: Sequence[Example]) -> Scored:
    texts = [e.text for e in examples]
    started = time.perf_counter()
    inference = classifier.infer(classifier.encode(texts))
    elapsed = time.perf_counter() - started
    probs = inference.probs
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
        fallback_top=np.array([lb in fallback_labels for lb in labels], dtype=bool),
        distances=inference.distances,
    )


def routes_at(s: Scored, threshold: float, max_distance: float | None = None) -> np.ndarray:
    """Each example's route under the category threshold and, when given, the distance limit."""
    low = s.route_scores < threshold
    if max_distance is not None and s.distances is not None:
        low |= s.distances > max_distance
    return np.where(low, FALLBACK, s.label_routes)


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


@dataclass(frozen=True)
class Choice:
    """An out-of-scope rule (`routes.json`'s `score`, `threshold`, `max_distance`) and its
    weighted routing accuracy on the set it was chosen on (weighted correct examples / weight)."""

    score: str
    threshold: float
    max_distance: float | None
    #: None when the rule was given, not chosen
    weighted_accuracy: float | None


def _weighted_correct(s: Scored, weights: np.ndarray, threshold: float, max_distances: np.ndarray) -> np.ndarray:
    """Weighted count of correctly routed examples for one threshold and each distance limit."""
    right_label = s.label_routes == s.gold_routes  # a fallback label on an out-of-scope item counts
    oos = s.gold_routes == FALLBACK
    low = s.route_scores < threshold
    assert s.distances is not None
    far = s.distances[None, :] > max_distances[:, None]  # (limits, examples)
    kept = ~(low[None, :] | far)
    correct = np.where(oos[None, :], ~kept | right_label[None, :], kept & right_label[None, :])
    counts: np.ndarray = correct @ weights
    return counts


def choose_score(s: Scored, oos_weight: float = 1.0) -> tuple[Choice, list[Choice]]:
    """The out-of-scope rule for a bundle with a Mahalanobis fit, chosen by the criterion that
    chooses the threshold (weighted routing accuracy): the best of the category threshold alone,
    the distance alone and both together, each at its own best threshold(s). A rule that adds
    the distance must beat the best simpler one by more than one out-of-scope example's weight:
    with 100 out-of-scope validation queries, smaller gains are one query's noise. Returns the
    chosen rule and every candidate."""
    weights = np.where(s.gold_routes == FALLBACK, oos_weight, 1.0)
    total = float(weights.sum())
    margin = max(oos_weight, 1.0) + 1e-9
    threshold = choose_threshold(s, oos_weight)
    never = np.array([np.inf])
    category_correct = float(_weighted_correct(s, weights, threshold, never)[0])
    assert s.distances is not None
    limits = np.unique(np.percentile(s.distances, DISTANCE_QUANTILES))[::-1]  # least fallback first
    distance_only = _best_limit(s, weights, 0.0, limits)
    both = max((_best_limit(s, weights, float(t), limits) for t in THRESHOLD_GRID), key=lambda c: c[1] - 1e-9 * c[0])
    correct = [category_correct, distance_only[1], both[1]]
    candidates = [
        Choice("category", threshold, None, category_correct),
        Choice("mahalanobis", 0.0, distance_only[2], distance_only[1]),
        Choice("category+mahalanobis", both[0], both[2], both[1]),
    ]
    chosen = 0
    for i in (1, 2):
        if correct[i] > correct[chosen] + margin:
            chosen = i
    rated = [Choice(c.score, c.threshold, c.max_distance, correct[i] / total) for i, c in enumerate(candidates)]
    return rated[chosen], rated


def _best_limit(s: Scored, weights: np.ndarray, threshold: float, limits: np.ndarray) -> tuple[float, float, float]:
    """(threshold, weighted correct, distance limit) at the best limit; the largest among ties."""
    counts = _weighted_correct(s, weights, threshold, limits)
    i = int(np.argmax(counts))  # limits run from large to small: the first maximum is the largest
    return threshold, float(counts[i]), float(limits[i])


def detection(scores: np.ndarray, in_scope: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and FPR at 95% TPR of `scores` (higher = more in scope; in scope is the positive
    class) under each row of example weights `w`, ties counted half (AUROC) and kept together
    (FPR: the threshold sits at a score value, so equal scores are all kept or all dropped).

    FPR@95: the highest threshold that keeps at least 95% of the in-scope weight; the share of
    out-of-scope weight at or above it."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]  # groups of equal scores, ascending
    pos = np.add.reduceat(w[:, order] * in_scope[order], starts, axis=1)
    neg = np.add.reduceat(w[:, order] * ~in_scope[order], starts, axis=1)
    p_total, n_total = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos * (below + 0.5 * neg)).sum(axis=1) / (p_total * n_total)
        pos_above = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # in-scope weight at or above each group
        neg_above = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
        last = (pos_above >= TPR_TARGET * p_total[:, None] * (1 - 1e-12)).sum(axis=1) - 1
        fpr = neg_above[np.arange(len(w)), np.maximum(last, 0)] / n_total
    empty = (p_total == 0) | (n_total == 0)
    auroc[empty], fpr[empty] = np.nan, np.nan
    return auroc, fpr


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
    figures = {
        "in_scope_accuracy": _rate(w, label_ok & (routes != FALLBACK), in_scope),
        "in_scope_accuracy_argmax": _rate(w, label_ok, in_scope),
        "in_scope_routing_accuracy": _rate(w, routed_ok, in_scope),
        "out_of_scope_recall": _rate(w, routes == FALLBACK, ~in_scope),
        "routing_accuracy": _rate(w, routed_ok, np.ones_like(in_scope)),
        "macro_f1": np.nanmean(per_label, axis=1),
    }
    for name, scores in s.in_scope_scores().items():
        figures[f"auroc_{name}"], figures[f"fpr_at_95_tpr_{name}"] = detection(scores, in_scope, w)
    return figures


def intervals(
    s: Scored,
    threshold: float,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    max_distance: float | None = None,
) -> dict[str, list[float] | None]:
    """95% percentile-bootstrap interval of each headline figure: resample the examples with
    replacement, recompute, take the 2.5th and 97.5th percentiles."""
    n = len(s.gold_labels)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)
    out: dict[str, list[float] | None] = {}
    for key, values in _figures(s, routes_at(s, threshold, max_distance), w).items():
        finite = values[~np.isnan(values)]
        out[key] = [float(x) for x in np.percentile(finite, [2.5, 97.5])] if len(finite) else None
    return out


def metrics(s: Scored, threshold: float, max_distance: float | None = None) -> dict[str, Any]:
    routes = routes_at(s, threshold, max_distance)
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
        "max_distance": max_distance,
        **figures,
        "intervals_95": intervals(s, threshold, max_distance=max_distance),
        "per_route": per_route,
        "items_per_s": s.items_per_s,
    }
