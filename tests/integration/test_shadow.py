"""Shadow mode on a real broker: a worker with a candidate bundle routes exactly as without one,
and the shadow topic holds what an offline `classify` with each bundle says, nothing more."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from devkit.toolkit import Output, read_outputs, start_worker
from tests.support import scenario
from tests.support.kafka import NEEDS_FAUST, TopicSet, create_topic, produce, run_cli
from tests.support.tiny_model import build_bundle

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
PARTITIONS = 3
#: The candidate hears "wire" as a flight and "rain" as out of scope: two texts of the scenario
#: change route (banking → travel, weather → fallback), the others do not.
CANDIDATE_KEYWORDS = {"wire": "flight", "rain": "oos"}


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("candidate") / "bundle", keywords=CANDIDATE_KEYWORDS, name="candidate")


def _offline(bundle: Path, texts: list[str]) -> list[dict]:
    """`classify-worker classify` with one bundle: the route object of each text, in order."""
    result = run_cli({"CW_MODEL__PATH": str(bundle)}, "classify", *texts)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line)["route"] for line in result.stdout.splitlines()]


def _verdict(route: dict) -> dict:
    return {
        "model": route["model"],
        "route": "fallback" if route["fallback"] else route["category"],
        "label": route["label"],
        "score": route["score"],
        "category_score": route["category_score"],
    }


def _expected(live: Path, candidate: Path, valid: dict[str, str]) -> tuple[dict[str, dict], Counter[tuple[str, str]]]:
    """Offline: the disagreement record each id must get, and the live → shadow route counts."""
    texts = sorted(set(valid.values()))
    mine = dict(zip(texts, map(_verdict, _offline(live, texts)), strict=True))
    theirs = dict(zip(texts, map(_verdict, _offline(candidate, texts)), strict=True))
    records = {
        ident: {"type": "disagreement", "id": ident, "primary": mine[t], "shadow": theirs[t]}
        for ident, t in valid.items()
        if mine[t]["route"] != theirs[t]["route"]
    }
    matrix = Counter((mine[t]["route"], theirs[t]["route"]) for t in valid.values())
    return records, matrix


#: The Faust engine is at-least-once, but nothing fails here, so it must deliver exactly once too.
ENGINES = [
    pytest.param("confluent", id="confluent"),
    pytest.param("faust", id="faust", marks=NEEDS_FAUST),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_shadow_records_equal_an_offline_classify_with_both_bundles(
    kafka_bootstrap: str, tiny_bundle: Path, candidate: Path, tmp_path: Path, engine: str
) -> None:
    # Given 600 mixed messages (30 malformed) and a worker shadowing the candidate bundle
    topics = TopicSet.fresh()
    shadow_topic = f"shadow-{topics.group}"
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    messages, expected = scenario.build(600)
    produce(kafka_bootstrap, topics.input, messages)
    valid = {k.decode(): json.loads(v)["text"] for k, v, _ in messages if expected[k.decode()].reason is None and v}
    env = {
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_SHADOW__MODEL_PATH": str(candidate),
        "CW_SHADOW__TOPIC": shadow_topic,
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_TOPICS__PARTITIONS": str(PARTITIONS),
        "CW_BATCH__MAX_ITEMS": "64",
        "CW_METRICS__PORT": "0",
    }

    # When it runs until the stream is idle
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, "--engine", engine, "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then routing is exactly what it is without a shadow: every id once, on its topic
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)

    # And the shadow topic holds exactly the offline disagreements, keyed like the input
    want, matrix = _expected(tiny_bundle, candidate, valid)
    assert want and len(want) < len(valid), "the candidate must disagree on some items, not all"
    shadow = read_outputs(kafka_bootstrap, [shadow_topic], expect=len(want) + 1, quiet_s=2.0)
    docs = [(o, json.loads(o.value or b"")) for o in shadow]
    got = [(o, d) for o, d in docs if d["type"] == "disagreement"]
    counts = Counter(d["id"] for _, d in got)
    assert sorted(k for k, n in counts.items() if n > 1) == [], "a disagreement recorded twice"
    assert set(counts) == set(want), (
        f"missing {sorted(set(want) - set(counts))[:10]}, extra {sorted(set(counts) - set(want))[:10]}"
    )
    wrong = [d["id"] for _, d in got if d != want[d["id"]]]
    assert wrong == [], f"{len(wrong)} differ from offline classify, e.g. {[want[i] for i in wrong[:1]]} vs record"
    assert all(o.key == d["id"].encode() and o.headers.get("trace-id") == o.key for o, d in got)

    # And the tallies count every valid item once, by live route → shadow route
    assert _tallied(docs) == matrix

    # And shadow-report says the same, read from the topic
    report = run_cli(env, "shadow-report", "--topic", shadow_topic, "--json", "--examples", "3")
    assert report.returncode == 0, report.stderr[-2000:]
    (pair,) = json.loads(report.stdout)
    assert (pair["items"], pair["disagreements"], pair["unscored"]) == (len(valid), len(want), 0)
    assert pair["disagreement_rate"] == round(len(want) / len(valid), 6)
    assert {(a, b): n for a, row in pair["matrix"].items() for b, n in row.items()} == dict(matrix)
    assert len(pair["examples"]) == 3 and all(e == want[e["id"]] for e in pair["examples"])


def _tallied(docs: list[tuple[Output, dict]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for _, d in docs:
        if d["type"] == "tally":
            assert d["unscored"] == 0
            for a, row in d["routes"].items():
                for b, n in row.items():
                    out[(a, b)] += n
    return out
