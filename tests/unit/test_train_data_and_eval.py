from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.errors import DataError
from worker.model import Classifier, load_bundle
from worker.routing import Router
from worker.train import evaluate
from worker.train.data import Columns, Example, load, load_categories, read_examples, with_extra_training


def test_csv_and_jsonl_give_the_same_stratified_split(tmp_path: Path) -> None:
    rows = [(f"text {i}", "a" if i % 3 else "b") for i in range(60)]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lb}\n" for t, lb in rows))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in rows))
    a, b = load(csv), load(jsonl)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert (len(a.train), len(a.val), len(a.test)) == (48, 6, 6), "10% of each label to test, 10% to validation"
    assert {e.label for e in a.val} == {e.label for e in a.test} == {"a", "b"}
    assert a.labels == ["a", "b"]


def test_a_plain_file_gets_disjoint_train_validation_and_test_splits(tmp_path: Path) -> None:
    # Given 500 distinct texts over 7 labels of uneven size
    rows = [(f"query number {i}", f"label{i % 7 if i % 5 else 0}") for i in range(500)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{lb}\n" for t, lb in rows))
    # When it is split
    s = load(tmp_path / "d.csv", seed=3)
    train, val, test = ({e.text for e in part} for part in (s.train, s.val, s.test))
    # Then no text is in two splits, none is lost, and the test split does not depend on how
    # much goes to validation: it was carved out first
    assert not (train & val) and not (train & test) and not (val & test), (train & test, val & test)
    assert train | val | test == {t for t, _ in rows}
    assert {e.label for e in s.test} == {lb for _, lb in rows}
    assert load(tmp_path / "d.csv", seed=3).test == s.test, "seeded"
    assert load(tmp_path / "d.csv", seed=4).test != s.test
    assert "carved out before anything else" in s.test_from


def test_a_test_file_replaces_the_carved_test_split(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    (tmp_path / "t.csv").write_text("text,label\nheld a,a\nheld b,b\n")
    s = load(tmp_path / "d.csv", test_file=tmp_path / "t.csv")
    assert s.test == [Example("held a", "a"), Example("held b", "b")]
    assert len(s.train) + len(s.val) == 40, "nothing of --data is set aside for test"


def test_csv_with_other_column_names_crlf_and_a_byte_order_mark(tmp_path: Path) -> None:
    # What a spreadsheet on Windows exports: BOM, CRLF line ends, a quoted field with a comma
    body = 'id,utterance,category\r\n1,check my balance,banking\r\n2,"book a flight, please",travel\r\n'
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "d.jsonl").write_bytes(b'{"utterance": "check my balance", "category": "banking"}\r\n')
    cols = Columns(text="utterance", label="category")
    assert read_examples(tmp_path / "d.csv", cols) == [
        Example("check my balance", "banking"),
        Example("book a flight, please", "travel"),
    ]
    assert read_examples(tmp_path / "d.jsonl", cols) == [Example("check my balance", "banking")]
    with pytest.raises(DataError, match="--label-column"):
        read_examples(tmp_path / "d.csv")


def test_clinc_layout_folds_oos_splits_into_each_split(tmp_path: Path) -> None:
    doc = {
        "train": [["hi", "greet"]],
        "oos_train": [["what", "oos"]],
        "val": [],
        "oos_val": [["x", "oos"]],
        "test": [["yo", "greet"]],
        "oos_test": [],
    }
    path = tmp_path / "clinc.json"
    path.write_text(json.dumps(doc))
    s = load(path)
    assert s.train == [Example("hi", "greet"), Example("what", "oos")]
    assert s.val == [Example("x", "oos")] and s.test == [Example("yo", "greet")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "words,tag\nx,y\n", "header with 'text' and 'label'"),
        ("d.jsonl", '{"text": "x", "label": "y"}\nnot json\n', "d.jsonl:2"),
        ("d.jsonl", '{"text": "x"}\n', "row 0"),
        ("d.json", "[1, 2]", "CLINC150 layout"),
    ],
)
def test_bad_data_files_name_the_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / name)


def test_added_examples_join_the_training_split_only_and_need_known_labels(tmp_path: Path) -> None:
    rows = [(f"text {i}", "a" if i % 2 else "oos") for i in range(40)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{lb}\n" for t, lb in rows))
    (tmp_path / "extra.jsonl").write_text('{"text": "who painted this", "label": "oos"}\n')
    (tmp_path / "typo.jsonl").write_text('{"text": "who painted this", "label": "oss"}\n')
    splits = load(tmp_path / "d.csv")
    extra = read_examples(tmp_path / "extra.jsonl")
    grown = with_extra_training(splits, extra, tmp_path / "extra.jsonl")
    assert grown.train == [*splits.train, Example("who painted this", "oos")]
    assert (grown.val, grown.test, grown.labels) == (splits.val, splits.test, splits.labels)
    with pytest.raises(DataError, match=r"typo\.jsonl: labels not in the training data: oss"):
        with_extra_training(splits, read_examples(tmp_path / "typo.jsonl"), tmp_path / "typo.jsonl")


def test_categories_accept_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"banking": ["balance", "transfer"]}')
    (tmp_path / "b.json").write_text('{"balance": "banking", "transfer": "banking"}')
    assert load_categories(tmp_path / "a.json") == load_categories(tmp_path / "b.json")


def test_metrics_and_threshold_choice_on_the_tiny_model(tmp_path: Path) -> None:
    bundle = load_bundle(build_bundle(tmp_path / "b", threshold=0.0))
    router = Router(bundle.routes, bundle.labels, load_settings())
    examples = [
        Example("my balance", "balance"),  # banking, confident
        Example("wire it", "transfer"),  # banking, confident
        Example("rain", "weather"),
        Example("tell me a story", "oos"),  # oos label -> fallback
        Example("balance rain", "oos"),  # out of scope, but predicted in scope at 0.5
    ]
    scored = evaluate.score(Classifier(bundle), router, examples)
    at_zero = evaluate.metrics(scored, 0.0)
    assert at_zero["out_of_scope_recall"] == 0.5
    t = evaluate.choose_threshold(scored)
    tuned = evaluate.metrics(scored, t)
    assert 0.49 < t < 0.99, "a threshold above the 0.5 tie and below the confident scores is best"
    assert tuned["out_of_scope_recall"] == 1.0
    assert tuned["routing_accuracy"] == 1.0 and at_zero["routing_accuracy"] == pytest.approx(4 / 5)
    assert tuned["per_route"]["fallback"]["support"] == 2
    assert at_zero["in_scope_accuracy_argmax"] == tuned["in_scope_accuracy_argmax"] == 1.0
    # deployed in-scope accuracy counts a right label sent to fallback as wrong
    in_scope_scores = scored.route_scores[:3]
    strict = evaluate.metrics(scored, float(in_scope_scores.min()) + 1e-6)
    diverted = int((in_scope_scores < in_scope_scores.min() + 1e-6).sum())
    assert 1 <= diverted < 3
    assert strict["in_scope_accuracy_argmax"] == 1.0
    assert strict["in_scope_accuracy"] == pytest.approx((3 - diverted) / 3)
    assert tuned["in_scope_accuracy"] == 1.0


def _scored(correct: list[bool]) -> evaluate.Scored:
    """In-scope examples of one label, right where `correct` says so, every score 1."""
    n = len(correct)
    return evaluate.Scored(
        gold_labels=["a"] * n,
        gold_routes=np.array(["A"] * n),
        top_labels=["a" if ok else "b" for ok in correct],
        route_scores=np.ones(n),
        label_routes=np.array(["A" if ok else "B" for ok in correct]),
        items_per_s=1.0,
    )


def test_bootstrap_intervals_match_the_binomial_normal_approximation() -> None:
    # 800 of 1,000 right: the normal approximation gives 0.8 ± 1.96·sqrt(0.8·0.2/1000) = ± 0.0248
    m = evaluate.metrics(_scored([i % 5 != 0 for i in range(1000)]), threshold=0.5)
    lo, hi = m["intervals_95"]["routing_accuracy"]
    assert m["routing_accuracy"] == 0.8
    assert lo == pytest.approx(0.8 - 0.0248, abs=0.004) and hi == pytest.approx(0.8 + 0.0248, abs=0.004)
    assert m["intervals_95"]["in_scope_accuracy"] == [lo, hi], "every example in scope: the same figure"
    assert m["intervals_95"]["out_of_scope_recall"] is None, "no out-of-scope examples, no interval"
    perfect = evaluate.metrics(_scored([True] * 50), threshold=0.5)
    assert perfect["intervals_95"]["routing_accuracy"] == [1.0, 1.0]
