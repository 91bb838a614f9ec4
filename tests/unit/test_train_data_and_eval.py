from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.tiny_model import build_bundle
from worker.config import load_settings
from worker.errors import DataError
from worker.model import Classifier, load_bundle
from worker.routing import Router
from worker.train import evaluate
from worker.train.data import Example, load, load_categories, read_examples, with_extra_training


def test_csv_and_jsonl_give_the_same_stratified_split(tmp_path: Path) -> None:
    rows = [(f"text {i}", "a" if i % 3 else "b") for i in range(60)]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lb}\n" for t, lb in rows))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in rows))
    a, b = load(csv), load(jsonl)
    assert a == b
    assert len(a.train) + len(a.val) == 60 and {e.label for e in a.val} == {"a", "b"}
    assert a.labels == ["a", "b"]


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
    assert at_zero["in_scope_accuracy"] == tuned["in_scope_accuracy"], "label accuracy ignores the threshold"
