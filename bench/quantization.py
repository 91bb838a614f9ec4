"""Speed and decisions of one fine-tuned checkpoint exported several ways, timed in one run,
in the same loops, on the same texts: fp32, dynamic int8 (the export before issue 16: ranges
measured per call, so batch-dependent), static int8 as `classify-worker train` writes it now
(operator form, `worker/train/int8.py`), and any other exports given with `--compare`
(e.g. issue 16's static QDQ bundle, from git history).

    git show c4f5f77:worker/model/default/model.onnx > /tmp/qdq.onnx
    python bench/quantization.py --checkpoint bench/baseline-model --bundle worker/model/default \\
        --data ../shared/data/clinc150/data_full.json --add-train out_of_scope_first460.jsonl \\
        --compare "static QDQ (issue 16)=/tmp/qdq.onnx" --exports /tmp/exports --runs 5

CKPT is a `train --save-torch` checkpoint; the bundle gives the tokenizer, labels and routes
(threshold). Decisions are compared on the validation split; the test split is not read.
Needs the [train] extra. Two loops, each timed per variant, variants interleaved within every
run so that load from other processes hits each alike, medians over `--runs`:
- plain: one onnxruntime session per export (default options: all optimizations, its own
  thread pool), the shuffled texts in calls of `--plain-batch`, padded to the call's longest;
- classifier: `Classifier.predict_proba` (length-sorted sub-batches, one single-threaded call
  per core), micro-batches of `--batch`, as the worker runs it.
No assertion: read the figures (bench/NOTES.md §9).
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
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from transformers import AutoModelForSequenceClassification

from worker.config import Settings
from worker.model import Classifier, load_bundle
from worker.routing import Router
from worker.train import evaluate
from worker.train.build import CALIBRATION_TEXTS
from worker.train.data import Splits, load, read_examples, with_extra_training
from worker.train.export import export, fuse, quantize
from worker.train.finetune import encode_batch, load_tokenizer

DYNAMIC = "dynamic int8 (before issue 16)"
STATIC = "static int8, operator form (train now)"
STATIC_ALL = "static int8, operator form, every weight product (agreement not enforced)"
FP32 = "fp32 (fused)"


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


def _classifier_loop(classifier: Classifier, texts: list[str], batch: int) -> tuple[float, float]:
    """Items per wall second, and per CPU second of this process (all its threads): on a machine
    shared with other jobs the second is the steadier measure of what the model costs."""
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        classifier.predict_proba(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - started), len(texts) / (time.process_time() - cpu)


def _plain_loop(session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]], n: int) -> tuple[float, float]:
    """The plain loop: pre-tokenized calls straight to onnxruntime, nothing of ours around them."""
    started, cpu = time.perf_counter(), time.process_time()
    for f in feeds:
        session.run(None, f)
    return n / (time.perf_counter() - started), n / (time.process_time() - cpu)


def _exports(args: argparse.Namespace, splits: Splits, where: Path) -> dict[str, Path]:
    """Build the exports into `where`, or reuse the ones a previous run left there (`--exports`)."""
    names = {FP32: "fp32.fused.onnx", DYNAMIC: "dynamic.onnx", STATIC: "static.onnx", STATIC_ALL: "static_all.onnx"}
    if not all((where / f).is_file() for f in names.values()):
        model = AutoModelForSequenceClassification.from_pretrained(str(args.checkpoint), dtype=torch.float32).eval()
        tok = load_tokenizer(args.checkpoint)
        val_texts = [e.text for e in splits.val]
        calibration = [e.text for e in random.Random(13).sample(splits.train, CALIBRATION_TEXTS)]
        export(model, tok, where / "fp32.onnx")
        fuse(where / "fp32.onnx", where / names[FP32], model)
        heads, hidden = model.config.num_attention_heads, model.config.hidden_size
        _dynamic(where / "fp32.onnx", where / names[DYNAMIC], heads, hidden)
        q = quantize(where / names[FP32], where / names[STATIC], tok, calibration, val_texts)
        print(f"static int8: agreement {q.int8_argmax_agreement:.4f} on validation, fp32 kept: {q.kept_fp32}")
        q = quantize(where / names[FP32], where / names[STATIC_ALL], tok, calibration, val_texts, min_agreement=0.0)
        print(f"static int8, every product: agreement {q.int8_argmax_agreement:.4f}", flush=True)
    others = {name: Path(path) for name, path in (c.split("=", 1) for c in args.compare)}
    return {name: where / f for name, f in names.items()} | others


def _table(title: str, speed: dict[str, list[float]], cpu: dict[str, list[float]], extra: dict[str, str]) -> None:
    base, base_cpu = statistics.median(speed[DYNAMIC]), statistics.median(cpu[DYNAMIC])
    print(f"\n{title}\n| export | items/s | x dynamic | items/CPU-s | x dynamic |{' decisions |' if extra else ''}")
    print("|---|---|---|---|---|" + ("---|" if extra else ""))
    for name in speed:
        s, c = statistics.median(speed[name]), statistics.median(cpu[name])
        tail = f" {extra[name]} |" if extra else ""
        print(f"| {name} | {s:.0f} | {s / base:.2f} | {c:.0f} | {c / base_cpu:.2f} |{tail}")
    ratios = [a / b for a, b in zip(speed[STATIC], speed[DYNAMIC], strict=True)]
    print(f"per-run ratio static/dynamic (items/s): {[round(r, 2) for r in ratios]}")
    print("runs (items/s):", {n: [round(x) for x in v] for n, v in speed.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--add-train", type=Path, action="append", default=[], help="as given to train (calibration)")
    ap.add_argument("--compare", action="append", default=[], help="NAME=PATH of another export to time")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=250, help="texts per predict_proba call (a worker micro-batch)")
    ap.add_argument("--plain-batch", type=int, default=64, help="texts per call in the plain loop")
    ap.add_argument("--texts", type=int, default=0, help="time on the first N shuffled validation texts (0: all)")
    ap.add_argument("--exports", type=Path, help="build the exports here and reuse them on the next run")
    args = ap.parse_args()

    splits = load(args.data)
    for path in args.add_train:
        splits = with_extra_training(splits, read_examples(path), path)
    val_texts = [e.text for e in splits.val]
    shuffled = val_texts[:]
    random.Random(0).shuffle(shuffled)
    shuffled = shuffled[: args.texts or None]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.exports:
            args.exports.mkdir(parents=True, exist_ok=True)
        variants = _exports(args, splits, args.exports or tmp)
        classifiers = {
            n: Classifier(load_bundle(_bundle(args.bundle, m, tmp / f"bundle{i}")))
            for i, (n, m) in enumerate(variants.items())
        }
        sessions = {n: ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for n, m in variants.items()}
        tok = load_tokenizer(args.checkpoint)
        feeds = [
            {k: v.numpy() for k, v in encode_batch(tok, shuffled[i : i + args.plain_batch]).items()}
            for i in range(0, len(shuffled), args.plain_batch)
        ]
        # fp32 is the reference for decisions, not timed: issue 16 measured it at 0.49x dynamic
        raced = [n for n in variants if n != FP32]
        timed: dict[str, dict[str, list[float]]] = {k: {n: [] for n in raced} for k in ("cw", "cc", "pw", "pc")}
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            for name in raced:
                wall, cpu = _classifier_loop(classifiers[name], shuffled, args.batch)
                timed["cw"][name].append(wall)
                timed["cc"][name].append(cpu)
                wall, cpu = _plain_loop(sessions[name], feeds, len(shuffled))
                timed["pw"][name].append(wall)
                timed["pc"][name].append(cpu)
        router = Router(classifiers[DYNAMIC].bundle.routes, classifiers[DYNAMIC].labels, Settings())
        reference = classifiers[FP32].predict_proba(val_texts).argmax(1)
        decisions = {}
        for name, c in classifiers.items():
            m = evaluate.metrics(evaluate.score(c, router, splits.val), router.threshold)
            agree = float((c.predict_proba(val_texts).argmax(1) == reference).mean())
            decisions[name] = (
                f"argmax = fp32 {agree:.2%}; val in-scope (deployed, threshold {router.threshold}) "
                f"{m['in_scope_accuracy']:.2%}; val routing {m['routing_accuracy']:.2%}"
            )
        n = len(shuffled)
        _table(
            f"plain loop: {n} validation texts, calls of {args.plain_batch}, median of {args.runs} runs",
            timed["pw"],
            timed["pc"],
            {},
        )
        _table(
            f"classifier: {n} validation texts, micro-batches of {args.batch}, median of {args.runs} runs",
            timed["cw"],
            timed["cc"],
            decisions,
        )
        print(f"| {FP32} (the reference, not timed) | | | | | {decisions[FP32]} |")


if __name__ == "__main__":
    main()
