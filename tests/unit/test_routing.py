from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.tiny_model import LABELS, build_bundle
from worker.config import load_settings
from worker.errors import ModelError
from worker.model import load_bundle
from worker.pipeline import build_pipeline
from worker.routing import Router, sanitize_topic_part


@pytest.fixture
def router(tmp_path: Path) -> Router:
    b = load_bundle(build_bundle(tmp_path / "b", threshold=0.6))
    return Router(b.routes, b.labels, load_settings())


def test_label_maps_to_its_category_topic(router: Router) -> None:
    d = router.route("transfer", 0.9)
    assert (d.topic, d.category, d.fallback, d.reason) == ("routed.banking", "banking", False, None)


def test_low_score_falls_back_with_reason(router: Router) -> None:
    d = router.route("hotel", 0.59)
    assert (d.topic, d.category, d.fallback, d.reason) == ("routed.fallback", "travel", True, "low_confidence")
    assert not router.route("hotel", 0.6).fallback, "a score equal to the threshold is confident enough"


def test_fallback_label_always_falls_back(router: Router) -> None:
    d = router.route("oos", 0.99)
    assert (d.topic, d.fallback, d.reason) == ("routed.fallback", True, "fallback_label")


def test_settings_threshold_overrides_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CW_ROUTING__THRESHOLD", "0.95")
    b = load_bundle(build_bundle(tmp_path / "b", threshold=0.1))
    assert Router(b.routes, b.labels, load_settings()).route("hotel", 0.9).reason == "low_confidence"


def test_without_routes_labels_are_their_own_categories(tmp_path: Path) -> None:
    b = load_bundle(build_bundle(tmp_path / "b", routes=False))
    r = Router(b.routes, b.labels, load_settings())
    assert r.route("hotel", 0.01).topic == "routed.hotel"
    assert "routed.oos" in r.topics()


def test_topics_lists_every_category_and_the_fallback(router: Router) -> None:
    assert router.topics() == ["routed.banking", "routed.fallback", "routed.travel", "routed.weather"]
    assert router.categories() == ["banking", "travel", "weather"]


@given(st.text(max_size=300))
def test_sanitized_names_are_legal_kafka_topic_parts(name: str) -> None:
    cleaned = sanitize_topic_part(name)
    assert re.fullmatch(r"[a-zA-Z0-9._-]+", cleaned), cleaned


def test_sanitize_keeps_legal_names_and_replaces_illegal_characters() -> None:
    assert sanitize_topic_part("credit_cards") == "credit_cards"
    assert sanitize_topic_part("Small Talk/chit-chat") == "Small_Talk_chit-chat"


def _probs(**by_label: float) -> np.ndarray:
    return np.array([[by_label.get(label, 0.0) for label in LABELS]], dtype=np.float32)


def test_category_score_sums_every_label_of_the_top_labels_category(router: Router) -> None:
    split_within_banking = _probs(balance=0.45, transfer=0.40, hotel=0.15)
    assert router.category_scores(split_within_banking)[0] == pytest.approx(0.85)
    split_across = _probs(balance=0.45, hotel=0.40, transfer=0.15)
    assert router.category_scores(split_across)[0] == pytest.approx(0.60)
    assert router.category_scores(_probs(oos=0.7, weather=0.3))[0] == pytest.approx(0.7), "oos is its own group"
    assert router.category_scores(np.zeros((0, len(LABELS)), dtype=np.float32)).shape == (0,)


def test_a_query_split_between_two_labels_of_one_category_still_routes(router: Router) -> None:
    probs = _probs(balance=0.45, transfer=0.40, hotel=0.15)  # top label alone is under the 0.6 threshold
    d = router.route("balance", float(router.category_scores(probs)[0]))
    assert (d.topic, d.fallback) == ("routed.banking", False)


def _bundle_with_categories(tmp_path: Path, categories: dict[str, str]) -> Path:
    directory = build_bundle(tmp_path / "b")
    doc = {"categories": categories, "threshold": 0.5, "fallback_labels": ["oos"]}
    (directory / "routes.json").write_text(json.dumps(doc))
    return directory


@pytest.mark.parametrize(
    ("categories", "names"),
    [
        ({"balance": "Small Talk", "transfer": "Small_Talk"}, ["'Small Talk'", "'Small_Talk'", "'routed.Small_Talk'"]),
        ({"flight": "travel/air", "hotel": "travel air"}, ["'travel air'", "'travel/air'", "'routed.travel_air'"]),
        ({"balance": "x" * 300, "transfer": "x" * 299 + "y"}, ["both map to topic"]),
    ],
)
def test_categories_whose_topic_names_collide_are_refused_at_load(
    tmp_path: Path, categories: dict[str, str], names: list[str]
) -> None:
    bundle = _bundle_with_categories(tmp_path, categories)
    with pytest.raises(ModelError) as raised:
        build_pipeline(load_settings(model={"path": bundle}))
    for name in names:
        assert name in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("category", "settings", "topic"),
    [
        ("fallback", {}, "routed.fallback"),
        ("in", {"topics": {"prefix": "classify."}}, "classify.in"),
        ("dlq", {"topics": {"prefix": "classify.", "dlq": "classify.dlq"}}, "classify.dlq"),
    ],
)
def test_a_category_routed_onto_the_fallback_input_or_dead_letter_topic_is_refused(
    tmp_path: Path, category: str, settings: dict, topic: str
) -> None:
    bundle = load_bundle(_bundle_with_categories(tmp_path, {"weather": category}))
    with pytest.raises(ModelError, match=rf"category '{category}'.*'{re.escape(topic)}'"):
        Router(bundle.routes, bundle.labels, load_settings(**settings))


def test_a_category_of_fallback_labels_only_may_share_the_fallback_topic_name(tmp_path: Path) -> None:
    # `oos` is a fallback label: its items always go to the fallback topic, whatever its category
    bundle = load_bundle(_bundle_with_categories(tmp_path, {"oos": "fallback"}))
    router = Router(bundle.routes, bundle.labels, load_settings())
    assert router.route("oos", 0.99).topic == "routed.fallback"
