"""A tiny, deterministic model bundle built in tests: a bag-of-words linear ONNX graph and a
WordLevel tokenizer, so unit and engine tests need neither torch nor the shipped model.

Each keyword votes for one label; any other word votes weakly for the out-of-scope label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

KEYWORDS: dict[str, str] = {
    "balance": "balance",
    "account": "balance",
    "transfer": "transfer",
    "wire": "transfer",
    "flight": "flight",
    "plane": "flight",
    "hotel": "hotel",
    "room": "hotel",
    "weather": "weather",
    "rain": "weather",
}
LABELS = ("balance", "flight", "hotel", "oos", "transfer", "weather")
CATEGORIES = {"balance": "banking", "transfer": "banking", "flight": "travel", "hotel": "travel", "weather": "weather"}
#: Logit each keyword adds to its label; unknown words add UNKNOWN_WEIGHT to `oos`.
KEYWORD_WEIGHT = 6.0
UNKNOWN_WEIGHT = 0.7
SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]")


def build_tokenizer(padding_to: int | None = None) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in KEYWORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    if padding_to:  # what a transformers-saved tokenizer.json often carries
        tok.enable_padding(length=padding_to, pad_id=3, pad_token="[PAD]")
    return tok


def build_weights(tok: Tokenizer, keywords: dict[str, str] | None = None) -> np.ndarray:
    """`keywords` re-points some of KEYWORDS' words at other labels (a candidate model that
    disagrees on them); the vocabulary stays the same."""
    vocab = tok.get_vocab()
    weights = np.zeros((len(vocab), len(LABELS)), dtype=np.float32)
    weights[vocab["[UNK]"], LABELS.index("oos")] = UNKNOWN_WEIGHT
    for word, label in {**KEYWORDS, **(keywords or {})}.items():
        weights[vocab[word], LABELS.index(label)] = KEYWORD_WEIGHT
    return weights


def build_graph(weights: np.ndarray, n_outputs: int | None = None, head: bool = False) -> onnx.ModelProto:
    """logits[b, c] = sum_t mask[b, t] * W[ids[b, t], c]; with `head`, the sum is a "pooled"
    tensor that an identity classifier head (MatMul + bias Add, as BERT's) turns into the same
    logits, so the graph has a head input to expose as an embedding."""
    if n_outputs is not None:
        weights = weights[:, :n_outputs]
    summed = "pooled" if head else "logits"
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], [summed], keepdims=0),
    ]
    width = weights.shape[1]
    head_weights = [
        numpy_helper.from_array(np.eye(width, dtype=np.float32), "H"),
        numpy_helper.from_array(np.zeros(width, dtype=np.float32), "H_bias"),
    ]
    if head:
        nodes += [
            helper.make_node("MatMul", ["pooled", "H"], ["head"]),
            helper.make_node("Add", ["head", "H_bias"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny-bow",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            *(head_weights if head else []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_bundle(
    directory: Path,
    *,
    threshold: float = 0.5,
    max_length: int = 64,
    routes: bool = True,
    padding_to: int | None = None,
    n_outputs: int | None = None,
    keywords: dict[str, str] | None = None,
    name: str = "tiny-bow",
    head: bool = False,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(padding_to)
    tok.save(str(directory / "tokenizer.json"))
    onnx.save(build_graph(build_weights(tok, keywords), n_outputs, head), str(directory / "model.onnx"))
    config = {"name": name, "id2label": {str(i): lb for i, lb in enumerate(LABELS)}, "max_length": max_length}
    (directory / "config.json").write_text(json.dumps(config))
    if routes:
        doc = {"categories": CATEGORIES, "threshold": threshold, "fallback_labels": ["oos"]}
        (directory / "routes.json").write_text(json.dumps(doc))
    return directory


if __name__ == "__main__":
    import sys

    print(build_bundle(Path(sys.argv[1])))
