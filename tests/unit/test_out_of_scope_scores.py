"""Issue 26 item 3: AUROC and FPR at 95% TPR (in scope = positive), the Mahalanobis fit, the
embedding output added to a graph, and a bundle that routes on the distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.support.batches import worst_batch_difference
from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.errors import ModelError
from worker.model import Classifier, load_bundle
from worker.model.distance import DISTANCE_FILE, EMBEDDING_OUTPUT
from worker.pipeline import build_pipeline
from worker.records import Record
from worker.train import evaluate
from worker.train.data import Example
from worker.train.mahalanobis import add_embedding_output, fit, fit_bundle, head_input


def _detect(in_scope_scores: list[float], oos_scores: list[float]) -> tuple[float, float]:
    scores = np.array(in_scope_scores + oos_scores, dtype=np.float64)
    positive = np.array([True] * len(in_scope_scores) + [False] * len(oos_scores))
    auroc, fpr = evaluate.detection(scores, positive, np.ones((1, len(scores))))
    return float(auroc[0]), float(fpr[0])


@pytest.mark.parametrize(
    ("in_scope", "oos", "auroc", "fpr"),
    [
        ([3, 4], [1, 2], 1.0, 0.0),  # separated: every out-of-scope item dropped
        ([1, 2], [3, 4], 0.0, 1.0),  # reversed
        ([1, 3], [2], 0.5, 1.0),  # keeping 95% of in-scope keeps the threshold at 1
        ([1], [1], 0.5, 1.0),  # a tie counts half, and a tied item is kept with its equals
        # 95% of 20 in-scope kept: threshold 2 (items 2..20); only 25 of the out-of-scope is >= 2;
        # pairs ranked right: 20 (0.5) + 19 (1.5) + 0 (25) of 60
        (list(range(1, 21)), [0.5, 1.5, 25], 39 / 60, 1 / 3),
    ],
)
def test_auroc_and_fpr_at_95_tpr_on_known_examples(in_scope: list, oos: list, auroc: float, fpr: float) -> None:
    got = _detect(in_scope, oos)
    assert got == pytest.approx((auroc, fpr)), f"in {in_scope} oos {oos}: got {got}, want {(auroc, fpr)}"


def test_detection_weights_equal_repeated_examples() -> None:
    # Given weights 2 and 3 on two examples: the same as those examples written out 2 and 3 times
    scores = np.array([0.9, 0.2, 0.5, 0.4])
    positive = np.array([True, True, False, False])
    weighted = evaluate.detection(scores, positive, np.array([[2.0, 1.0, 3.0, 1.0]]))
    repeated = _detect([0.9, 0.9, 0.2], [0.5, 0.5, 0.5, 0.4])
    assert (float(weighted[0][0]), float(weighted[1][0])) == pytest.approx(repeated)


def test_detection_without_one_class_is_nan() -> None:
    auroc, fpr = evaluate.detection(np.array([0.1, 0.2]), np.array([True, True]), np.ones((1, 2)))
    assert np.isnan(auroc[0]) and np.isnan(fpr[0])


def _clusters(rng: np.random.Generator, n_per: int, means: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, list]:
    chol = np.linalg.cholesky(cov)
    x = np.vstack([m + rng.standard_normal((n_per, len(m))) @ chol.T for m in means])
    return x, [f"c{i}" for i in range(len(means)) for _ in range(n_per)]


def test_mahalanobis_fit_recovers_the_shared_covariance_of_gaussian_clusters() -> None:
    # Given three Gaussian clusters sharing one anisotropic covariance
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    cov = a @ a.T + 0.5 * np.eye(4)
    means = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=np.float64)
    x, labels = _clusters(rng, 4000, means, cov)
    # When fitted
    m = fit(x, labels)
    # Then the whitening maps the covariance to the identity, and distances are the true ones
    np.testing.assert_allclose(m.whitening.T @ cov @ m.whitening, np.eye(4), atol=0.05)
    probe = rng.standard_normal((50, 4)) * 5
    inverse = np.linalg.inv(cov)
    true = np.sqrt(np.min([np.einsum("ij,jk,ik->i", probe - mu, inverse, probe - mu) for mu in means], axis=0))
    np.testing.assert_allclose(m.distances(probe), true, rtol=0.05)
    assert m.labels == ("c0", "c1", "c2")


def test_mahalanobis_separates_a_far_cluster_and_scores_rows_alone() -> None:
    rng = np.random.default_rng(1)
    cov = np.diag([1.0, 4.0, 0.25])
    x, labels = _clusters(rng, 500, np.array([[0, 0, 0], [6, 0, 0]]), cov)
    m = fit(x, labels)
    near, _ = _clusters(rng, 200, np.array([[0, 0, 0]]), cov)
    far, _ = _clusters(rng, 200, np.array([[3, 0, 4]]), cov)  # between the means in x, off in z
    d = m.distances(np.vstack([near, far]))
    auroc, _ = evaluate.detection(-d, np.arange(400) < 200, np.ones((1, 400)))
    assert auroc[0] > 0.99, auroc
    alone = np.array([m.distances(row[None, :])[0] for row in np.vstack([near, far])])
    assert np.array_equal(alone, d), "a row's distance must not depend on the rows beside it"


TRAIN = [
    Example(text, label)
    for label, texts in {
        "balance": ["my account balance", "balance of account", "account balance now", "what balance"],
        "transfer": ["wire money", "transfer funds", "wire a transfer", "transfer it"],
        "flight": ["book a flight", "plane ticket", "flight plane", "a flight"],
        "hotel": ["hotel room", "a room", "room in a hotel", "hotel"],
        "weather": ["weather today", "will it rain", "rain weather", "weather"],
        "oos": ["sing a song", "tell a joke"],
    }.items()
    for text in texts
]


@pytest.fixture
def fitted(tmp_path: Path) -> Path:
    out = build_bundle(tmp_path / "b", head=True)
    fit_bundle(out, TRAIN, frozenset({"oos"}))
    return out


def test_the_embedding_output_is_the_head_input_and_leaves_the_logits_alone(tmp_path: Path) -> None:
    out = build_bundle(tmp_path / "b", head=True)
    texts = ["my balance", "book a hotel room", "rain", "hello there"]
    before = Classifier(load_bundle(out)).predict_proba(texts)
    assert head_input(onnx.load(str(out / "model.onnx"))) == "pooled"
    add_embedding_output(out / "model.onnx")
    add_embedding_output(out / "model.onnx")  # a second call adds nothing
    outputs = [o.name for o in onnx.load(str(out / "model.onnx")).graph.output]
    assert outputs == ["logits", EMBEDDING_OUTPUT]
    assert np.array_equal(Classifier(load_bundle(out)).predict_proba(texts), before)


def test_a_graph_whose_logits_come_from_no_product_is_refused(tmp_path: Path) -> None:
    out = build_bundle(tmp_path / "b")  # logits straight from a ReduceSum
    with pytest.raises(ModelError, match="ReduceSum"):
        add_embedding_output(out / "model.onnx")


def test_the_fit_joins_the_bundle_version_and_gives_distances_in_any_batch(tmp_path: Path, fitted: Path) -> None:
    plain = build_bundle(tmp_path / "plain", head=True)
    add_embedding_output(plain / "model.onnx")
    assert load_bundle(fitted).version != load_bundle(plain).version, "the fit decides routes: it is versioned"
    c = Classifier(load_bundle(fitted))
    assert c.distance is not None and c.distance.labels == ("balance", "flight", "hotel", "transfer", "weather")
    texts = [e.text for e in TRAIN] + ["wire " * 300 + "hotel", "nothing known here", "flight hotel rain"]
    inference = c.infer(c.encode(texts))
    assert inference.distances is not None and inference.distances.shape == (len(texts),)
    assert worst_batch_difference(c, texts * 4) == 0.0


def _route_on_distance(bundle: Path, max_distance: float, score: str | None = None) -> None:
    routes = json.loads((bundle / "routes.json").read_text())
    routes.update({"threshold": 0.0, "max_distance": max_distance})
    if score is not None:
        routes["score"] = score
    (bundle / "routes.json").write_text(json.dumps(routes))


def test_a_text_far_from_every_intent_falls_back_as_out_of_distribution(fitted: Path) -> None:
    # Given a limit between a training text's distance and that of a text mixing every intent
    c = Classifier(load_bundle(fitted))
    assert c.distance is not None
    near, mixed = c.infer(c.encode(["my account balance", "balance wire flight hotel rain"])).distances
    assert mixed > near
    _route_on_distance(fitted, float((near + mixed) / 2), "mahalanobis")
    assert load_bundle(fitted).routes.score == "mahalanobis"
    # When the pipeline routes both
    pipeline = build_pipeline(load_settings(model={"path": fitted}))
    texts = ["my account balance", "balance wire flight hotel rain"]
    outs = pipeline.process([Record(json.dumps({"text": t}).encode()) for t in texts]).outgoing
    routes = [json.loads(o.value or b"{}")["route"] for o in outs]
    # Then the far one goes to fallback, saying why, with its distance
    assert [o.topic for o in outs] == ["routed.banking", "routed.fallback"], routes
    assert routes[1]["reason"] == "out_of_distribution" and routes[1]["distance"] == pytest.approx(mixed, rel=1e-5)
    assert "reason" not in routes[0] and routes[0]["distance"] == pytest.approx(near, rel=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: _route_on_distance(d, -1.0), "'max_distance' must be a positive number"),
        (lambda d: _route_on_distance(d, 5.0, "category"), "'score' says 'category'"),
    ],
)
def test_routes_json_distance_settings_are_checked(fitted: Path, change, message: str) -> None:
    change(fitted)
    with pytest.raises(ModelError, match=message):
        load_bundle(fitted)


def test_a_distance_limit_without_its_fit_is_a_model_error(fitted: Path) -> None:
    _route_on_distance(fitted, 5.0)
    (fitted / DISTANCE_FILE).unlink()
    with pytest.raises(ModelError, match=r"mahalanobis\.npz is missing"):
        Classifier(load_bundle(fitted))


def _scored(distance_only: int) -> evaluate.Scored:
    """6 in-scope items (category score high), one out-of-scope item the category score catches
    and `distance_only` more that only their distance gives away."""
    n_oos = 1 + distance_only
    gold = np.array(["a"] * 6 + ["fallback"] * n_oos)
    return evaluate.Scored(
        gold_labels=list(gold),
        gold_routes=gold,
        top_labels=["a"] * len(gold),
        route_scores=np.array([0.9] * 6 + [0.2] + [0.9] * distance_only),
        label_routes=np.array(["a"] * len(gold)),
        items_per_s=1.0,
        fallback_top=np.zeros(len(gold), dtype=bool),
        distances=np.array([1.0] * 7 + [9.0] * distance_only),
    )


def test_choose_score_keeps_the_category_unless_the_distance_wins_by_more_than_one_oos_example() -> None:
    # When the distance catches one more out-of-scope item: worth one example, not enough
    chosen, candidates = evaluate.choose_score(_scored(distance_only=1), oos_weight=1.0)
    assert chosen.score == "category", candidates
    assert [c.score for c in candidates] == ["category", "mahalanobis", "category+mahalanobis"]
    assert candidates[2].weighted_accuracy == 1.0
    # When it catches two more, both scores together win (all right; the distance alone misses
    # the item only the category score catches)
    chosen, candidates = evaluate.choose_score(_scored(distance_only=2), oos_weight=1.0)
    assert chosen.score == "category+mahalanobis" and chosen.weighted_accuracy == 1.0, candidates
    assert candidates[1].weighted_accuracy == pytest.approx(8 / 9)
    assert chosen.max_distance is not None and 1.0 <= chosen.max_distance < 9.0
