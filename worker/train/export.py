"""Export a fine-tuned PyTorch classifier to ONNX (opset 18, dynamic batch and sequence axes),
fuse it with onnxruntime's transformer optimizer, quantize it to int8 with ranges calibrated on
training texts (static quantization), and check both against PyTorch.

Static, not dynamic, quantization: dynamic int8 measures each activation's range on every call,
over every text in the batch, so a text's probabilities (and near the threshold its route)
depended on which other messages shared its batch. With fixed ranges a text's scores are the
same alone or in any batch, and the per-call range pass disappears (bench/NOTES.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from worker.errors import ModelError
from worker.model.classifier import softmax
from worker.train import int8
from worker.train.finetune import encode_batch, predict_proba

OPSET = 18
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: fp32 ONNX must match PyTorch to float noise; int8 may move probabilities but rarely the argmax.
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_AGREEMENT = 0.97
#: Share of validation texts whose argmax the int8 model must keep from fp32 (issue 16); below
#: it, `quantize` leaves the matrix products that lose most decisions in fp32.
MIN_INT8_AGREEMENT = 0.995
#: Validation texts each layer's sensitivity is measured on: enough to rank 48 layers, few
#: enough that ranking them takes minutes, not an hour.
SENSITIVITY_TEXTS = 300
#: Calibration batch: texts of similar length, as the classifier's sub-batches have.
CALIBRATION_BATCH = 32

log = logging.getLogger(__name__)


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@dataclass(frozen=True)
class Parity:
    fp32_max_abs_diff: float
    int8_max_abs_diff: float
    int8_argmax_agreement: float
    checked: int


def export(model: PreTrainedModel, tok: Tokenizer, fp32_path: Path) -> None:
    """The dynamo exporter: with transformers 5 the legacy TorchScript tracer produced graphs off
    by ~1e-2 in logits here, the dynamo one matches PyTorch to ~1e-7. Eager attention, because
    the SDPA path exports NaN guards (IsNaN/Where per layer) that block operator fusion."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    sample = encode_batch(tok, ["a short query", "a somewhat longer query to export with"])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        _LogitsOnly(model).eval(),  # the wrapper too: a new Module starts in training mode
        tuple(sample[n] for n in INPUTS),
        str(fp32_path),
        input_names=list(INPUTS),
        output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )


def fuse(fp32_path: Path, fused_path: Path, model: PreTrainedModel) -> Path:
    """Skip+LayerNorm and Bias+GELU fusions: the same arithmetic in fewer kernels, which with
    short queries is where the time goes (measured in bench/NOTES.md). Attention stays unfused:
    static quantization has no int8 kernel for the fused Attention operator, while the separate
    Q/K/V products quantize. Only BERT-family encoders are known to the optimizer; for other
    architectures the export is returned as it is (its weights may sit in an external data file
    next to it, so it is not copied)."""
    cfg = model.config
    if cfg.model_type not in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"):
        return fp32_path
    options = FusionOptions("bert")
    options.enable_attention = False
    fused = optimizer.optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        opt_level=0,
        optimization_options=options,
    )
    fused.save_model_to_file(str(fused_path))
    return fused_path


@dataclass(frozen=True)
class Quantization:
    """How the int8 model was made and how often it keeps fp32's decision on validation."""

    method: str
    calibration_texts: int
    checked: int
    int8_argmax_agreement: float
    min_agreement: float
    #: MatMul nodes left in fp32 because quantizing them lost decisions (empty when none did).
    kept_fp32: list[str] = field(default_factory=list)


def _batches(tok: Tokenizer, texts: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Training texts in length-sorted batches, fed to the fp32 model to record activation ranges."""
    ordered = sorted(texts, key=len)
    for i in range(0, len(ordered), CALIBRATION_BATCH):
        yield {k: v.numpy() for k, v in encode_batch(tok, ordered[i : i + CALIBRATION_BATCH]).items()}


def quantize(
    fp32_path: Path,
    int8_path: Path,
    tok: Tokenizer,
    calibration: Sequence[str],
    check: Sequence[str],
    min_agreement: float = MIN_INT8_AGREEMENT,
) -> Quantization:
    """Static int8 in operator form (`worker.train.int8`: per-column int8 weights, per-tensor
    uint8 activations with MinMax ranges recorded on `calibration`, which must be training texts;
    the embedding tables as int8). If the int8 model keeps fp32's argmax on fewer than
    `min_agreement` of `check` (validation texts), the fewest most sensitive weight products that
    restore it are left in fp32 (`_least_harmful_fp32_set`)."""
    reference = _onnx_proba(fp32_path, tok, list(check))
    fp32 = onnx.load(str(fp32_path))
    nodes = [p.node for p in int8.weight_products(fp32)]
    ranges = int8.calibrate(fp32, _batches(tok, calibration))

    def build(quantized: list[str], texts: Sequence[str] = check) -> np.ndarray:
        keep = [n for n in nodes if n not in quantized]
        onnx.save(int8.rewrite(fp32, ranges, keep_fp32=keep), str(int8_path))
        return _onnx_proba(int8_path, tok, list(texts))

    def agreement(kept_fp32: list[str]) -> float:
        quantized = [n for n in nodes if n not in kept_fp32]
        return float((build(quantized).argmax(1) == reference.argmax(1)).mean())

    kept: list[str] = []
    if agreement([]) < min_agreement:
        kept = _least_harmful_fp32_set(nodes, build, reference, list(check), agreement, min_agreement)
    final = agreement(kept)
    return Quantization(
        method=(
            "static int8, operator form: QuantizeLinear + MatMulIntegerToFloat, weights per column, "
            "activations per tensor with MinMax ranges, embedding tables"
        ),
        calibration_texts=len(calibration),
        checked=len(check),
        int8_argmax_agreement=final,
        min_agreement=min_agreement,
        kept_fp32=kept,
    )


def _least_harmful_fp32_set(
    nodes: list[str],
    build: Callable[[list[str], Sequence[str]], np.ndarray],
    reference: np.ndarray,
    check: list[str],
    agreement: Callable[[list[str]], float],
    min_agreement: float,
) -> list[str]:
    """The fewest MatMuls to leave in fp32: rank them by how far quantizing each one alone moves
    the probabilities of a sample of `check` (per-layer sensitivity), then find by bisection the
    shortest head of that ranking whose fp32 keeps `min_agreement` (agreement grows, if not
    strictly, as more of the most sensitive layers stay fp32; all of them is fp32 itself)."""
    probe = check[:SENSITIVITY_TEXTS]
    moved = {n: float(np.abs(build([n], probe) - reference[: len(probe)]).sum()) for n in nodes}
    ranked = sorted(nodes, key=lambda n: -moved[n])
    lo, hi = 0, len(ranked)  # agreement(ranked[:hi]) is enough; (ranked[:lo]) is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = agreement(ranked[:mid]) >= min_agreement
        log.info("%d most sensitive MatMuls in fp32: %s", mid, "enough" if ok else "not enough")
        lo, hi = (lo, mid) if ok else (mid, hi)
    return ranked[:hi]


def _onnx_proba(path: Path, tok: Tokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(texts), 128):
        feeds = {k: v.numpy() for k, v in encode_batch(tok, texts[start : start + 128]).items()}
        (logits,) = session.run(["logits"], feeds)
        out.append(softmax(np.asarray(logits, dtype=np.float32)))
    return np.concatenate(out)


def check_parity(model: PreTrainedModel, tok: Tokenizer, fp32: Path, int8: Path, texts: list[str]) -> Parity:
    """Raise `ModelError` when an exported graph disagrees with the PyTorch model."""
    reference = predict_proba(model, tok, texts)
    p32 = _onnx_proba(fp32, tok, texts)
    p8 = _onnx_proba(int8, tok, texts)
    parity = Parity(
        fp32_max_abs_diff=float(np.abs(reference - p32).max()),
        int8_max_abs_diff=float(np.abs(reference - p8).max()),
        int8_argmax_agreement=float((reference.argmax(1) == p8.argmax(1)).mean()),
        checked=len(texts),
    )
    if parity.fp32_max_abs_diff > FP32_MAX_ABS_DIFF:
        raise ModelError(f"fp32 ONNX export disagrees with PyTorch: max |Δp| {parity.fp32_max_abs_diff:.2e}")
    if parity.int8_argmax_agreement < INT8_MIN_AGREEMENT:
        raise ModelError(f"int8 model agrees with PyTorch on only {parity.int8_argmax_agreement:.1%} of inputs")
    return parity
