"""The model shipped in the package: it loads, routes the project's own queries, and its
published figures hold on the CLINC150 test split (when ../shared/data is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CLINC
from tests.support.batches import MAX_ABS_DIFF, mixed_lengths, worst_batch_difference
from worker.config import load_settings
from worker.model import Classifier, default_bundle_path, load_bundle
from worker.pipeline import build_pipeline
from worker.records import Record
from worker.routing import Router
from worker.train import evaluate
from worker.train.data import load

OWN_OUT_OF_SCOPE = Path(evaluate.__file__).parent / "out_of_scope.jsonl"

#: The project's own sentences (not from any data set), two per domain, and where they belong.
FIXED = [
    ("how much money is left in my checking account", "banking"),
    ("move two hundred dollars from savings into checking", "banking"),
    ("my visa card got declined at the pharmacy", "credit_cards"),
    ("I dropped my credit card somewhere downtown", "credit_cards"),
    ("how long should I roast a whole chicken", "kitchen_and_dining"),
    ("get me a table for four at an italian place tonight", "kitchen_and_dining"),
    ("add paper towels to my shopping list", "home"),
    ("remind me to water the plants at six", "home"),
    ("when does my car need its next oil change", "auto_and_commute"),
    ("what tire pressure should my sedan have", "auto_and_commute"),
    ("is my flight to denver on time", "travel"),
    ("do I need a visa to visit brazil", "travel"),
    ("set a timer for fifteen minutes", "utility"),
    ("what time is it in sydney", "utility"),
    ("how many vacation days remain for me", "work"),
    ("when is payday this month", "work"),
    ("what do people usually call you", "small_talk"),
    ("is this a real person or a bot", "small_talk"),
    ("turn the volume up please", "meta"),
    ("can you say that again", "meta"),
]
OUT_OF_SCOPE = ["how do black holes form", "write a haiku about autumn leaves", "who won the world cup in 1966"]


def test_default_bundle_has_ten_domains_and_a_fallback() -> None:
    bundle = load_bundle(default_bundle_path())
    router = Router(bundle.routes, bundle.labels, load_settings())
    assert len(bundle.labels) == 151 and bundle.routes.fallback_labels == {"oos"}
    assert len(router.categories()) == 10
    assert len(router.topics()) == 11, "10 category topics + routed.fallback"
    assert 0 < bundle.routes.threshold < 1


def test_default_bundle_routes_the_projects_own_queries() -> None:
    pipeline = build_pipeline(load_settings())
    texts = [q for q, _ in FIXED] + OUT_OF_SCOPE
    outs = pipeline.process([Record(json.dumps({"text": t}).encode()) for t in texts]).outgoing
    got = [json.loads(o.value or b"{}")["route"] for o in outs]
    routes = ["fallback" if r["fallback"] else r["category"] for r in got]
    wrong = [
        (t, want, have)
        for t, want, have in zip(texts, [d for _, d in FIXED] + ["fallback"] * len(OUT_OF_SCOPE), routes, strict=True)
        if want != have
    ]
    assert wrong == [], wrong


@pytest.mark.slow
def test_default_bundle_scores_a_text_the_same_in_any_batch() -> None:
    # Given 500 texts of mixed length (the project's own queries, long documents among them)
    own = [json.loads(line)["text"] for line in OWN_OUT_OF_SCOPE.read_text().splitlines()]
    texts = mixed_lengths([q for q, _ in FIXED] + own, 500)
    assert max(len(t.split()) for t in texts) > 300, "some texts must be chunked"
    # When each is scored alone and inside shuffled batches of 2..256
    worst = worst_batch_difference(Classifier(load_bundle(default_bundle_path())), texts)
    # Then its probabilities (hence its route) are the same
    assert worst <= MAX_ABS_DIFF, worst


clinc = pytest.mark.skipif(not (CLINC / "data_full.json").exists(), reason=f"CLINC150 not found at {CLINC}")


@pytest.fixture(scope="module")
def test_metrics() -> dict:
    bundle = load_bundle(default_bundle_path())
    router = Router(bundle.routes, bundle.labels, load_settings())
    scored = evaluate.score(Classifier(bundle), router, load(CLINC / "data_full.json").test)
    return evaluate.metrics(scored, router.threshold)


@clinc
@pytest.mark.slow
def test_published_figures_reproduce_on_the_clinc150_test_split(test_metrics: dict) -> None:
    published = json.loads((default_bundle_path() / "metrics.json").read_text())["test"]
    for key in ("in_scope_accuracy", "in_scope_accuracy_argmax", "out_of_scope_recall", "routing_accuracy"):
        assert test_metrics[key] == pytest.approx(published[key], abs=1e-9), key
    assert test_metrics["examples"] == 5500


def test_readme_prints_the_bundles_test_figures() -> None:
    published = json.loads((default_bundle_path() / "metrics.json").read_text())["test"]
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### The default model") : readme.index("### Train your own")]
    for key in ("in_scope_accuracy", "in_scope_accuracy_argmax", "out_of_scope_recall", "routing_accuracy"):
        lo, hi = published["intervals_95"][key]
        figure = f"{published[key]:.1%} [{lo:.1%}, {hi:.1%}]"
        assert figure in section, f"README lacks {key} {figure}"


@clinc
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 16: the model validation chose (C') scores 94.7% deployed in-scope [94.0, 95.4] and "
    "94.4% routing [93.8, 95.0] on test, under the 95.0% targets (docs/model-card.md)",
)
def test_issue_targets_on_the_clinc150_test_split(test_metrics: dict) -> None:
    """Issue 16's targets, deployed definitions, model chosen on validation alone."""
    assert test_metrics["in_scope_accuracy"] >= 0.950
    assert test_metrics["out_of_scope_recall"] >= 0.85
    assert test_metrics["routing_accuracy"] >= 0.950


@clinc
@pytest.mark.slow
def test_out_of_scope_auroc_meets_issue_26s_target(test_metrics: dict) -> None:
    """Issue 26: AUROC >= 0.97 on test, in scope = positive, for the score the bundle routes on."""
    assert test_metrics["auroc_softmax"] >= 0.97, test_metrics["auroc_softmax"]


@clinc
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 26: 85.4% out-of-scope recall, 94.7% deployed in-scope, 94.4% routing on test; a "
    "Mahalanobis score did not beat the category score on validation (docs/model-card.md)",
)
def test_issue_26_targets_on_the_clinc150_test_split(test_metrics: dict) -> None:
    assert test_metrics["out_of_scope_recall"] >= 0.90
    assert test_metrics["in_scope_accuracy"] >= 0.955
    assert test_metrics["routing_accuracy"] >= 0.96
