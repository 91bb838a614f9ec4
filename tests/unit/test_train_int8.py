"""Static int8 in operator form (`worker.train.int8`) on a small graph built here: the products
become fused integer kernels, the biases fold into them, the result stays near fp32, and a row's
output does not depend on the rows beside it (where onnxruntime's dynamic int8 does)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.train import int8

VOCAB, WIDTH, HIDDEN, CLASSES = 50, 16, 32, 5


def _graph(seed: int = 0) -> onnx.ModelProto:
    """ids -> embedding -> MatMul+bias -> Relu -> MatMul+bias -> logits per token."""
    rng = np.random.default_rng(seed)
    weights = {
        "emb": rng.normal(0, 1, (VOCAB, WIDTH)),
        "w1": rng.normal(0, 0.3, (WIDTH, HIDDEN)),
        "b1": rng.normal(0, 0.1, (HIDDEN,)),
        "w2": rng.normal(0, 0.3, (HIDDEN, CLASSES)),
        "b2": rng.normal(0, 0.1, (CLASSES,)),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["y0"], name="mm2"),
        helper.make_node("Add", ["y0", "b2"], ["logits"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", CLASSES])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input_ids": ids})
    return np.asarray(out)


def _batches(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (8, 7))} for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_and_int8() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    fp32 = _graph()
    return fp32, int8.rewrite(fp32, int8.calibrate(fp32, _batches(20)))


def test_weight_products_are_found_with_their_biases() -> None:
    found = int8.weight_products(_graph())
    assert [(p.node, p.activation, p.weight, p.bias, p.output) for p in found] == [
        ("mm1", "x", "w1", "b1", "h1"),
        ("mm2", "h", "w2", "b2", "logits"),
    ]


def test_products_become_fused_integer_kernels_with_the_biases_folded_in(fp32_and_int8: tuple) -> None:
    _, q = fp32_and_int8
    onnx.checker.check_model(q)
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops == {"Gather": 1, "DequantizeLinear": 1, "QuantizeLinear": 2, "MatMulIntegerToFloat": 2, "Relu": 1}
    stored = {i.name: i.data_type for i in q.graph.initializer}
    assert stored["emb_int8"] == stored["w1_int8"] == stored["w2_int8"] == TensorProto.INT8
    assert not {"emb", "w1", "w2"} & set(stored), "no fp32 copy of a quantized table or matrix is kept"


def test_int8_stays_close_to_fp32(fp32_and_int8: tuple) -> None:
    fp32, q = fp32_and_int8
    ids = _batches(1, seed=7)[0]["input_ids"]
    want, got = _run(fp32, ids), _run(q, ids)
    assert np.abs(want - got).max() < 0.05 * np.abs(want).max(), np.abs(want - got).max()
    assert (want.argmax(-1) == got.argmax(-1)).mean() > 0.9


def test_a_row_scores_the_same_alone_and_in_any_batch(fp32_and_int8: tuple) -> None:
    # Given rows whose neighbours differ wildly in range (one row of a single repeated token)
    _, q = fp32_and_int8
    rng = np.random.default_rng(3)
    rows = rng.integers(0, VOCAB, (64, 7))
    rows[5] = 0
    # When each row runs alone and inside the batch
    alone = np.concatenate([_run(q, rows[i : i + 1]) for i in range(len(rows))])
    together = _run(q, rows)
    # Then the outputs are bit-identical
    assert np.array_equal(alone, together), np.abs(alone - together).max()


def test_the_check_can_fail_dynamic_int8_moves_a_row_with_its_neighbours(tmp_path: Path) -> None:
    """The oracle above is not vacuous: onnxruntime's dynamic int8, which measures each call's
    range over the whole batch, fails it on the same rows."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(_graph(), str(tmp_path / "fp32.onnx"))
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    dynamic = onnx.load(str(tmp_path / "dyn.onnx"))
    rows = np.random.default_rng(3).integers(0, VOCAB, (64, 7))
    alone = np.concatenate([_run(dynamic, rows[i : i + 1]) for i in range(len(rows))])
    assert not np.array_equal(alone, _run(dynamic, rows))


def test_products_named_to_keep_stay_fp32() -> None:
    fp32 = _graph()
    q = int8.rewrite(fp32, int8.calibrate(fp32, _batches(5)), keep_fp32=["mm2"])
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMul"] == 1 and ops["Add"] == 1 and ops["MatMulIntegerToFloat"] == 1
    assert next(n for n in q.graph.node if n.op_type == "MatMul").name == "mm2"
