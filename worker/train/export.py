"""Export a fine-tuned PyTorch classifier to ONNX (opset 18, dynamic batch and sequence axes),
fuse it with onnxruntime's transformer optimizer, quantize it to int8 with onnxruntime's dynamic
quantization, and check both against PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from worker.errors import ModelError
from worker.train.finetune import encode_batch, predict_proba

OPSET = 18
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: fp32 ONNX must match PyTorch to float noise; int8 may move probabilities but rarely the argmax.
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_AGREEMENT = 0.97


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
        _LogitsOnly(model.eval()),
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
    short queries is where the time goes (measured in bench/NOTES.md). Only BERT-family encoders
    are known to the optimizer; for other architectures the export is returned as it is (its
    weights may sit in an external data file next to it, so it is not copied)."""
    cfg = model.config
    if cfg.model_type not in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"):
        return fp32_path
    fused = optimizer.optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        opt_level=0,
    )
    fused.save_model_to_file(str(fused_path))
    return fused_path


def quantize(fp32_path: Path, int8_path: Path) -> None:
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)


def _onnx_proba(path: Path, tok: Tokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(texts), 128):
        feeds = {k: v.numpy() for k, v in encode_batch(tok, texts[start : start + 128]).items()}
        (logits,) = session.run(["logits"], feeds)
        z = logits - logits.max(axis=1, keepdims=True)
        out.append(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True))
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
