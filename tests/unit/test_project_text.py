"""The sentences the project ships are its own: demo traffic, the default model's fixed test
queries, and the out-of-scope queries added to its training data. None may be a CLINC150
sentence, and the added training queries must not paraphrase an evaluation query, or the
published figures and the demo's "routed as expected" share would flatter the model."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from devkit import traffic as demo_traffic
from tests.conftest import CLINC
from tests.unit.test_default_model import FIXED, OUT_OF_SCOPE
from worker.train.data import read_examples

ADDED_OOS = Path(__file__).resolve().parents[2] / "worker" / "train" / "out_of_scope.jsonl"
#: Word-set overlap (Jaccard) at which two queries count as paraphrases of each other.
NEAR = 0.7


def words(text: str) -> frozenset[str]:
    return frozenset(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def paraphrases(queries: list[str], corpus: list[str]) -> list[tuple[str, str]]:
    """Pairs (query, corpus sentence) with word-set Jaccard ≥ NEAR, found by prefix filtering:
    two such sets must share one of the |s| - ceil(NEAR·|s|) + 1 rarest words of each, so only
    sentences sharing a rare word are compared (all pairs would take seconds)."""
    sets = {t: words(t) for t in queries + corpus}
    freq = Counter(w for ws in sets.values() for w in ws)

    def prefix(ws: frozenset[str]) -> list[str]:
        return sorted(ws, key=lambda w: (freq[w], w))[: len(ws) - math.ceil(NEAR * len(ws)) + 1]

    index: dict[str, list[str]] = {}
    for t in corpus:
        for w in prefix(sets[t]):
            index.setdefault(w, []).append(t)
    return [
        (q, t)
        for q in queries
        for t in {t for w in prefix(sets[q]) for t in index.get(w, ())}
        if jaccard(sets[q], sets[t]) >= NEAR
    ]


def held_out_queries() -> list[str]:
    demo = [q for qs in demo_traffic.QUERIES.values() for q in qs] + demo_traffic.OUT_OF_SCOPE
    return demo + [q for q, _ in FIXED] + OUT_OF_SCOPE


def added_queries() -> list[str]:
    return [e.text for e in read_examples(ADDED_OOS)]


def test_added_out_of_scope_queries_are_unique_and_all_fallback() -> None:
    examples = read_examples(ADDED_OOS)
    assert len(examples) >= 400
    assert {e.label for e in examples} == {"oos"}
    seen = [" ".join(sorted(words(e.text))) for e in examples]
    assert len(set(seen)) == len(seen), "duplicate queries in out_of_scope.jsonl"


def test_added_training_queries_do_not_paraphrase_demo_or_test_queries() -> None:
    assert paraphrases(added_queries(), held_out_queries()) == []


@pytest.mark.skipif(not (CLINC / "data_full.json").exists(), reason=f"CLINC150 not found at {CLINC}")
def test_no_shipped_sentence_is_a_clinc150_sentence_and_none_paraphrases_its_evaluation_splits() -> None:
    doc = json.loads((CLINC / "data_full.json").read_text(encoding="utf-8"))
    everything = {words(text) for rows in doc.values() for text, _ in rows}
    ours = held_out_queries() + added_queries()
    assert [q for q in ours if words(q) in everything] == []

    evaluation = [t for split in ("val", "test", "oos_val", "oos_test") for t, _ in doc[split]]
    close = paraphrases(added_queries(), evaluation)
    assert close == [], f"added training queries paraphrase CLINC150 evaluation queries: {close}"
