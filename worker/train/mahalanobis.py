"""Give a bundle the Mahalanobis out-of-scope score: expose the pooled embedding as a second
output of its ONNX graph, and fit class means and a shared covariance on the training split.

The fit needs only the training texts of the in-scope labels, so `train` does it for any
taxonomy; whether the bundle *uses* the distance is chosen on validation (`evaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from worker.errors import ModelError
from worker.model import Classifier, load_bundle
from worker.model.distance import DISTANCE_FILE, EMBEDDING_OUTPUT, Mahalanobis, save
from worker.train.data import Example

log = logging.getLogger(__name__)

#: Ridge added to the shared covariance, as a share of its mean variance: keeps the inverse
#: finite when some embedding directions barely vary (tanh-saturated units) or when there are
#: fewer training texts than dimensions; on CLINC150 it changes nothing measurable.
SHRINKAGE = 1e-4
#: The head's possible operators and the quantization steps between it and its input.
_PRODUCTS = ("Gemm", "MatMul", "MatMulIntegerToFloat", "QLinearMatMul")
_QUANTIZATION = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def head_input(model: onnx.ModelProto) -> str:
    """The fp32 tensor the classifier head (the last matrix product before the logits) reads:
    BERT's pooled [CLS] embedding. Found by walking back from the first graph output through a
    bias Add and any (de)quantization of the head's input."""
    producer = {out: n for n in model.graph.node for out in n.output}
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type not in _PRODUCTS:
        if node.op_type != "Add":
            raise ModelError(f"graph: logits come from a {node.op_type} node, not a matrix product")
        node = next((producer[i] for i in node.input if i in producer), None)
    if node is None:
        raise ModelError("graph: no matrix product feeds the logits")
    tensor = str(node.input[0])
    while tensor in producer and producer[tensor].op_type in _QUANTIZATION:
        tensor = str(producer[tensor].input[0])
    return tensor


def add_embedding_output(path: Path) -> None:
    """Rewrite the ONNX file at `path` with `EMBEDDING_OUTPUT` (the head's input) as a second
    output. The arithmetic is unchanged: logits stay bit for bit what they were."""
    model = onnx.load(str(path))
    if any(o.name == EMBEDDING_OUTPUT for o in model.graph.output):
        return
    tensor = head_input(model)
    model.graph.node.append(helper.make_node("Identity", [tensor], [EMBEDDING_OUTPUT], name="pooled_embedding_output"))
    model.graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    log.info("graph output %s added: the input of the classifier head, %s", EMBEDDING_OUTPUT, tensor)


def fit(embeddings: np.ndarray, labels: Sequence[str]) -> Mahalanobis:
    """Class means and one covariance shared by all classes (the within-class scatter), both in
    float64; stored as the whitening `W = V Λ^-1/2` of `Σ = V Λ Vᵀ` and the whitened means."""
    x = np.asarray(embeddings, dtype=np.float64)
    names = sorted(set(labels))
    if not names:
        raise ModelError("Mahalanobis fit: no in-scope training examples")
    index = np.array([names.index(lb) for lb in labels])
    means = np.stack([x[index == i].mean(axis=0) for i in range(len(names))])
    centred = x - means[index]
    covariance = centred.T @ centred / len(x)
    covariance += np.eye(len(covariance)) * SHRINKAGE * np.trace(covariance) / len(covariance)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors / np.sqrt(eigenvalues)[None, :]
    return Mahalanobis(whitening, means @ whitening, tuple(names))


def fit_bundle(bundle_dir: Path, train: Sequence[Example], fallback_labels: frozenset[str]) -> Mahalanobis:
    """Add the embedding output to the bundle's graph, embed the training texts of the in-scope
    labels with it (the deployed int8 graph, so the fit sees what scoring will see), fit, and
    write `mahalanobis.npz` next to `model.onnx`."""
    add_embedding_output(bundle_dir / "model.onnx")
    (bundle_dir / DISTANCE_FILE).unlink(missing_ok=True)  # a stale fit must not be loaded with the new graph
    in_scope = [e for e in train if e.label not in fallback_labels]
    classifier = Classifier(load_bundle(bundle_dir))
    result = fit(classifier.embed([e.text for e in in_scope]), [e.label for e in in_scope])
    save(bundle_dir / DISTANCE_FILE, result)
    return result
