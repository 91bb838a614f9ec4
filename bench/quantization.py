"""Classifier-alone speed and decisions of one fine-tuned checkpoint exported three ways, timed
in one run on the same texts: fp32, dynamic int8 (the export before issue 16: attention fused,
ranges measured per call) and static int8 (what `classify-worker train` writes now).

    python bench/quantization.py --checkpoint CKPT --bundle worker/model/default \\
        --data ../shared/data/clinc150/data_full.json

CKPT is a `train --save-torch` checkpoint; the bundle gives the tokenizer, labels and routes
(threshold). Decisions are compared on the validation split; the test split is not read.
Needs the [train] extra. Timings are medians of `--runs` passes, variants interleaved so that
load from other processes hits each alike. No assertion: read the figures (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from transformers import AutoModelForSequenceClassification

from worker.config import Settings
from worker.model import Classifier, load_bundle
from worker.routing import Router
from worker.train import evaluate
from worker.train.build import CALIBRATION_TEXTS
from worker.train.data import load, read_examples, with_extra_training
from worker.train.export import export, fuse, quantize
from worker.train.finetune import load_tokenizer


def _dynamic(fp32: Path, out: Path, heads: int, hidden: int) -> None:
    """The export before issue 16: the optimizer's default fusions (Attention included, where it
    recognises the mask subgraph; transformers 5's it does not), then dynamic int8."""
    fused = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    fused.save_model_to_file(str(out.with_suffix(".fused.onnx")))
    quantize_dynamic(str(out.with_suffix(".fused.onnx")), str(out), weight_type=QuantType.QInt8)


def _bundle(template: Path, model: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    for name in ("tokenizer.json", "config.json", "routes.json"):
        shutil.copy(template / name, where / name)
    shutil.copy(model, where / "model.onnx")
    return where


def _items_per_s(classifier: Classifier, texts: list[str], batch: int) -> tuple[float, float]:
    """Items per wall second, and per CPU second of this process (all its threads): on a machine
    shared with other jobs the second is the steadier measure of what the model costs."""
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        classifier.predict_proba(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - started), len(texts) / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--add-train", type=Path, action="append", default=[], help="as given to train (calibration)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=250, help="texts per predict_proba call (a worker micro-batch)")
    args = ap.parse_args()

    splits = load(args.data)
    for path in args.add_train:
        splits = with_extra_training(splits, read_examples(path), path)
    model = AutoModelForSequenceClassification.from_pretrained(str(args.checkpoint), dtype=torch.float32).eval()
    tok = load_tokenizer(args.checkpoint)
    val_texts = [e.text for e in splits.val]
    calibration = [e.text for e in random.Random(13).sample(splits.train, CALIBRATION_TEXTS)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        export(model, tok, tmp / "fp32.onnx")
        fused = fuse(tmp / "fp32.onnx", tmp / "fp32.fused.onnx", model)
        _dynamic(tmp / "fp32.onnx", tmp / "dynamic.onnx", model.config.num_attention_heads, model.config.hidden_size)
        q = quantize(fused, tmp / "static.onnx", tok, calibration, val_texts)
        print(f"static int8: agreement {q.int8_argmax_agreement:.4f} on validation, fp32 kept: {q.kept_fp32}")
        quantize(fused, tmp / "static_all.onnx", tok, calibration, val_texts, min_agreement=0.0)
        variants = {
            "fp32 (fused)": fused,
            "dynamic int8 (before)": tmp / "dynamic.onnx",
            "static int8 (now)": tmp / "static.onnx",
            "static int8, every MatMul (agreement not enforced)": tmp / "static_all.onnx",
        }
        classifiers = {
            n: Classifier(load_bundle(_bundle(args.bundle, m, tmp / f"bundle{i}")))
            for i, (n, m) in enumerate(variants.items())
        }
        router = Router(classifiers["fp32 (fused)"].bundle.routes, classifiers["fp32 (fused)"].labels, Settings())
        threshold = router.threshold
        reference = classifiers["fp32 (fused)"].predict_proba(val_texts).argmax(1)
        timed: dict[str, list[float]] = {n: [] for n in classifiers}
        per_cpu_s: dict[str, list[float]] = {n: [] for n in classifiers}
        shuffled = val_texts[:]
        random.Random(0).shuffle(shuffled)
        for _ in range(args.runs):
            for name, c in classifiers.items():
                wall, cpu = _items_per_s(c, shuffled, args.batch)
                timed[name].append(wall)
                per_cpu_s[name].append(cpu)
        base = statistics.median(timed["dynamic int8 (before)"])
        base_cpu = statistics.median(per_cpu_s["dynamic int8 (before)"])
        print(f"\n{len(shuffled)} validation texts, batches of {args.batch}, median of {args.runs} runs")
        print(
            "| export | items/s | x dynamic | items/CPU-s | x dynamic | argmax = fp32 "
            "| val in-scope (deployed) | val routing |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, c in classifiers.items():
            m = evaluate.metrics(evaluate.score(c, router, splits.val), threshold)
            speed, cpu = statistics.median(timed[name]), statistics.median(per_cpu_s[name])
            agree = float((c.predict_proba(val_texts).argmax(1) == reference).mean())
            print(
                f"| {name} | {speed:.0f} | {speed / base:.2f} | {cpu:.0f} | {cpu / base_cpu:.2f} | {agree:.2%} | "
                f"{m['in_scope_accuracy']:.2%} | {m['routing_accuracy']:.2%} |"
            )
        print("runs (items/s):", {n: [round(x) for x in v] for n, v in timed.items()})
        print("runs (items/CPU-s):", {n: [round(x) for x in v] for n, v in per_cpu_s.items()})
        print(
            "fp32 vs static max |Δp| on validation:",
            float(
                np.abs(
                    classifiers["fp32 (fused)"].predict_proba(val_texts)
                    - classifiers["static int8 (now)"].predict_proba(val_texts)
                ).max()
            ),
        )


if __name__ == "__main__":
    main()
