from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.model import Prediction, load_bundle
from worker.routing import Router, sanitize_topic_part


@pytest.fixture
def router(tmp_path: Path) -> Router:
    b = load_bundle(build_bundle(tmp_path / "b", threshold=0.6))
    return Router(b.routes, b.labels, load_settings())


def _p(label: str, score: float) -> Prediction:
    return Prediction(label, score, ((label, score),))


def test_label_maps_to_its_category_topic(router: Router) -> None:
    d = router.route(_p("transfer", 0.9))
    assert (d.topic, d.category, d.fallback, d.reason) == ("routed.banking", "banking", False, None)


def test_low_score_falls_back_with_reason(router: Router) -> None:
    d = router.route(_p("hotel", 0.59))
    assert (d.topic, d.category, d.fallback, d.reason) == ("routed.fallback", "travel", True, "low_confidence")
    assert not router.route(_p("hotel", 0.6)).fallback, "a score equal to the threshold is confident enough"


def test_fallback_label_always_falls_back(router: Router) -> None:
    d = router.route(_p("oos", 0.99))
    assert (d.topic, d.fallback, d.reason) == ("routed.fallback", True, "fallback_label")


def test_settings_threshold_overrides_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CW_ROUTING__THRESHOLD", "0.95")
    b = load_bundle(build_bundle(tmp_path / "b", threshold=0.1))
    assert Router(b.routes, b.labels, load_settings()).route(_p("hotel", 0.9)).reason == "low_confidence"


def test_without_routes_labels_are_their_own_categories(tmp_path: Path) -> None:
    b = load_bundle(build_bundle(tmp_path / "b", routes=False))
    r = Router(b.routes, b.labels, load_settings())
    assert r.route(_p("hotel", 0.01)).topic == "routed.hotel"
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
