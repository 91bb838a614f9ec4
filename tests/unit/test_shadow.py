"""Shadow mode without a broker: the candidate's records, the tally, failure isolation, the
metrics counted from committed tallies, and the report summarised from the topic's records."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest
from prometheus_client import CollectorRegistry

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.errors import InferenceError, ModelError
from worker.messages import ShadowDisagreement, ShadowRecord, ShadowTally, ShadowVerdict
from worker.model.bundle import load_bundle
from worker.observability import PrometheusHooks
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Outgoing, Record
from worker.routing import Router
from worker.shadow_report import format_report, summarize
from worker.topics import required_topics

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "shadow.schema.json").read_text())
TEXTS = ["my account balance", "please wire the rent", "is rain expected", "book a flight", "tell me a joke"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shadow")
    live = build_bundle(root / "live")
    candidate = build_bundle(root / "candidate", keywords={"wire": "flight", "rain": "oos"}, name="candidate")
    return live, candidate


def _pipeline(bundles: tuple[Path, Path], shadow: bool = True) -> Pipeline:
    live, candidate = bundles
    settings = load_settings(model={"path": live}, shadow={"model_path": candidate, "topic": "sh"})
    return build_pipeline(settings, shadow=shadow)


def _records(texts: list[str]) -> list[Record]:
    return [
        Record(orjson.dumps({"id": f"i{n}", "text": t}), f"k{n}".encode(), [("trace", b"t")], "in", 0, n)
        for n, t in enumerate(texts)
    ]


def _split(outgoing: list[Outgoing]) -> tuple[list[Outgoing], list[dict]]:
    primary = [o for o in outgoing if o.kind != "shadow"]
    return primary, [orjson.loads(o.value or b"") for o in outgoing if o.kind == "shadow"]


def test_shadow_never_changes_the_primary_outputs(bundles: tuple[Path, Path]) -> None:
    records = _records([*TEXTS, ""])
    with_shadow, _ = _split(_pipeline(bundles).process(records).outgoing)
    without = _pipeline(bundles, shadow=False).process(records).outgoing
    as_tuples = [(o.topic, o.value, o.key, o.headers, o.kind, o.detail) for o in with_shadow]
    assert as_tuples == [(o.topic, o.value, o.key, o.headers, o.kind, o.detail) for o in without]


def test_disagreements_and_one_tally_per_batch_on_the_shadow_topic(bundles: tuple[Path, Path]) -> None:
    outgoing = _pipeline(bundles).process(_records(TEXTS)).outgoing
    shadow = [o for o in outgoing if o.kind == "shadow"]
    assert {o.topic for o in shadow} == {"sh"}
    *disagreements, tally = [orjson.loads(o.value or b"") for o in shadow]
    got = {d["id"]: (d["primary"]["route"], d["shadow"]["route"]) for d in disagreements}
    assert got == {"i1": ("banking", "travel"), "i2": ("weather", "fallback")}
    assert [o.key for o in shadow] == [b"k1", b"k2", None], "disagreements keyed like the input; tally keyless"
    live_model, candidate_model = disagreements[0]["primary"]["model"], disagreements[0]["shadow"]["model"]
    assert live_model.startswith("tiny-bow@") and candidate_model.startswith("candidate@")
    assert tally == {
        "type": "tally",
        "primary_model": live_model,
        "shadow_model": candidate_model,
        "items": 5,
        "unscored": 0,
        "routes": {"banking": {"banking": 1, "travel": 1}, "weather": {"fallback": 1}, "travel": {"travel": 1},
                   "fallback": {"fallback": 1}},
    }  # fmt: skip
    for doc in [*disagreements, tally]:
        jsonschema.validate(doc, SCHEMA)


def test_dead_letters_are_not_scored_and_an_all_invalid_batch_has_no_shadow_records(
    bundles: tuple[Path, Path],
) -> None:
    _, docs = _split(_pipeline(bundles).process(_records(["", "rain"])).outgoing)
    assert [d["items"] for d in docs if d["type"] == "tally"] == [1]
    invalid = [Record(b"{", None, [], "in", 0, 1), Record(None, None, [], "in", 0, 2)]
    assert [o.kind for o in _pipeline(bundles).process(invalid).outgoing] == ["dead_letter", "dead_letter"]


class _Broken:
    """Stands in for the shadow classifier: every call fails as onnxruntime would."""

    def encode(self, texts: list[str]) -> None:
        raise InferenceError("onnxruntime failed on a batch")


def test_a_failing_shadow_counts_unscored_items_and_the_batch_is_delivered(bundles: tuple[Path, Path]) -> None:
    pipeline = _pipeline(bundles)
    assert pipeline.shadow is not None
    pipeline.shadow.classifier = _Broken()  # type: ignore[assignment]
    primary, docs = _split(pipeline.process(_records(TEXTS)).outgoing)
    assert [o.kind for o in primary] == ["routed", "routed", "routed", "routed", "fallback"]
    assert [(d["type"], d["items"], d["unscored"]) for d in docs] == [("tally", 0, 5)]
    _, again = _split(pipeline.process(_records(TEXTS[:2])).outgoing)
    assert again[0]["unscored"] == 2


def test_metrics_count_committed_tallies_and_leave_the_message_counters_alone(bundles: tuple[Path, Path]) -> None:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    outcome = _pipeline(bundles).process(_records(TEXTS))
    hooks.on_batch(outcome)
    hooks.on_committed(outcome.outgoing, 1_700_000_000_000)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("classify_shadow_items_total") == 5
    assert value("classify_shadow_unscored_total") == 0
    assert value("classify_shadow_disagreements_total", **{"from": "banking", "to": "travel"}) == 1
    assert value("classify_shadow_disagreements_total", **{"from": "weather", "to": "fallback"}) == 1
    assert value("classify_shadow_disagreements_total", **{"from": "travel", "to": "travel"}) is None
    assert value("classify_messages_total", outcome="routed") == 4
    assert value("classify_batch_size_sum") == 5


def test_the_shadow_topic_is_required_and_a_broken_shadow_bundle_fails_at_start(
    bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    live, candidate = bundles
    settings = load_settings(model={"path": live}, shadow={"model_path": candidate})
    bundle = load_bundle(live)
    router = Router(bundle.routes, bundle.labels, settings)
    assert "classify.shadow" in required_topics(settings, router)
    assert "classify.shadow" not in required_topics(load_settings(model={"path": live}), router)
    with pytest.raises(ModelError, match="nope"):
        build_pipeline(load_settings(model={"path": live}, shadow={"model_path": tmp_path / "nope"}))


def _verdict(model: str, route: str) -> ShadowVerdict:
    return ShadowVerdict(model=model, route=route, label=route, score=0.9, category_score=0.9)


def test_report_sums_tallies_per_model_pair_and_keeps_a_few_examples() -> None:
    def tally(a: str, routes: dict[str, dict[str, int]], unscored: int = 0) -> ShadowTally:
        items = sum(n for row in routes.values() for n in row.values())
        return ShadowTally(primary_model=a, shadow_model="c", items=items, unscored=unscored, routes=routes)

    def disagree(n: int) -> ShadowDisagreement:
        return ShadowDisagreement(id=f"i{n}", primary=_verdict("a", "banking"), shadow=_verdict("c", "travel"))

    records = [
        tally("a", {"banking": {"banking": 6, "travel": 2}}),
        disagree(1),
        disagree(2),
        tally("a", {"banking": {"travel": 1}, "weather": {"weather": 1}}, unscored=3),
        disagree(3),
        tally("old", {"banking": {"banking": 4}}),
    ]
    first, second = summarize(records, examples=2)
    assert (first.items, first.unscored, first.disagreements, first.rate) == (10, 3, 3, 0.3)
    assert [e.id for e in first.examples] == ["i1", "i2"]
    assert first.as_dict()["matrix"] == {"banking": {"banking": 6, "travel": 3}, "weather": {"weather": 1}}
    assert (second.primary_model, second.items, second.disagreements) == ("old", 4, 0)
    text = format_report(first)
    assert "disagreements 3 (30.00%)" in text and "i1: banking -> travel" in text
    row = next(line for line in text.splitlines() if line.startswith("banking"))
    assert row.split()[1:] == ["6", "3", "."], "zero cells are dots, so the disagreements stand out"


def test_a_shadow_record_round_trips_through_the_published_union() -> None:
    doc = ShadowDisagreement(id="x", primary=_verdict("a", "banking"), shadow=_verdict("c", "fallback"))
    parsed = ShadowRecord.model_validate_json(orjson.dumps(doc.model_dump())).root
    assert parsed == doc


def test_shadow_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CW_SHADOW__MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("CW_SHADOW__TOPIC", "candidates")
    shadow = load_settings().shadow
    assert (shadow.model_path, shadow.topic) == (tmp_path, "candidates")
    monkeypatch.delenv("CW_SHADOW__MODEL_PATH")
    assert load_settings().shadow.model_path is None, "off unless a bundle is named"
