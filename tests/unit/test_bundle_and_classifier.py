from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.tiny_model import LABELS, build_bundle
from worker.errors import ModelError
from worker.model import Classifier, load_bundle


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return build_bundle(tmp_path / "b")


def test_bundle_reads_labels_routes_and_a_content_version(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    assert b.labels == LABELS
    assert b.routes.threshold == 0.5
    assert b.routes.fallback_labels == {"oos"}
    assert b.model_id == f"tiny-bow@{b.version}" and len(b.version) == 12
    routes = json.loads((bundle_dir / "routes.json").read_text())
    routes["threshold"] = 0.9
    (bundle_dir / "routes.json").write_text(json.dumps(routes))
    assert load_bundle(bundle_dir).version != b.version, "version must change when routing changes"


def test_bundle_without_routes_json_loads_with_identity_routes(tmp_path: Path) -> None:
    b = load_bundle(build_bundle(tmp_path / "b", routes=False))
    assert b.routes.categories == {} and b.routes.threshold == 0.0


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx: missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"id2label": {}}'), "non-empty 'id2label'"),
        (lambda d: (d / "config.json").write_text('{"id2label": {"0": "a", "2": "b"}}'), "without gaps"),
        (lambda d: (d / "routes.json").write_text('{"categories": {"nope": "x"}}'), "labels not in config.json"),
        (lambda d: (d / "routes.json").write_text('{"threshold": 3}'), "'threshold' must be"),
    ],
)
def test_broken_bundles_raise_model_error_naming_the_problem(bundle_dir: Path, breakage, message: str) -> None:
    breakage(bundle_dir)
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle_dir)


def test_corrupt_onnx_is_a_model_error(bundle_dir: Path) -> None:
    (bundle_dir / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Classifier(load_bundle(bundle_dir))


def test_corrupt_tokenizer_is_a_model_error(bundle_dir: Path) -> None:
    (bundle_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        Classifier(load_bundle(bundle_dir))


def test_label_count_that_does_not_match_the_logits_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model has 4 outputs but config.json names 6 labels"):
        Classifier(load_bundle(build_bundle(tmp_path / "b", n_outputs=4)))


def test_predicts_keywords_with_top_k(bundle_dir: Path) -> None:
    c = Classifier(load_bundle(bundle_dir), top_k=3)
    preds = c.predict(["what is my account balance", "book a plane", "will it rain", "hello there"])
    assert [p.label for p in preds] == ["balance", "flight", "weather", "oos"]
    assert preds[0].score > 0.99
    assert len(preds[0].top_k) == 3 and preds[0].top_k[0] == (preds[0].label, preds[0].score)
    assert preds[0].top_k[1][1] <= preds[0].top_k[0][1]
    assert c.predict([]) == []


def test_padding_stored_in_tokenizer_json_is_ignored(tmp_path: Path) -> None:
    texts = ["my balance", "hello", "flight hotel room plane wire"]
    plain = Classifier(load_bundle(build_bundle(tmp_path / "plain"))).predict_proba(texts)
    padded = Classifier(load_bundle(build_bundle(tmp_path / "padded", padding_to=48))).predict_proba(texts)
    np.testing.assert_allclose(plain, padded, rtol=1e-6)


def test_token_budget_sub_batching_does_not_change_results(bundle_dir: Path) -> None:
    texts = [("balance " * (i % 9)) + "rain " * (i % 5) + "x" for i in range(100)]
    whole = Classifier(load_bundle(bundle_dir), token_budget=100_000).predict_proba(texts)
    split = Classifier(load_bundle(bundle_dir), token_budget=64).predict_proba(texts)
    np.testing.assert_allclose(whole, split, rtol=1e-6)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_concurrent_inference_calls_give_the_sequential_results_in_input_order(bundle_dir: Path, threads: int) -> None:
    texts = [("balance " * (i % 9)) + "rain " * (i % 5) + "flight " * (i % 3) + "x" for i in range(100)]
    sequential = Classifier(load_bundle(bundle_dir), token_budget=64, threads=1).predict_proba(texts)
    concurrent = Classifier(load_bundle(bundle_dir), token_budget=64, threads=threads)
    np.testing.assert_allclose(concurrent.predict_proba(texts), sequential, rtol=1e-6)
    assert len(concurrent._spread([[0, 1, 2]])) == min(threads, 3), "a small batch is split across the threads"


def test_long_documents_are_chunked_not_truncated(tmp_path: Path) -> None:
    # max_length 8: 6 content tokens a chunk. The only keyword is far past the first chunk.
    c = Classifier(load_bundle(build_bundle(tmp_path / "b", max_length=8)), stride=2)
    doc = "the " * 40 + "weather weather weather"
    pred = c.predict([doc, "the the weather"])
    assert pred[0].label == "weather" or pred[0].top_k[1][0] == "weather", "tail of the document was ignored"
    truncated = c.predict(["the " * 6])[0]
    assert dict(pred[0].top_k)["weather"] > dict(truncated.top_k).get("weather", 0.0) + 0.05
    assert pred[1].label == "weather"


def test_sub_batches_keep_short_texts_away_from_long_ones_and_respect_the_budget(bundle_dir: Path) -> None:
    c = Classifier(load_bundle(bundle_dir), token_budget=600)
    texts = ["rain"] * 100 + ["balance " * 40] * 100  # 3 and 42 tokens
    encoded = c.encode(texts)
    groups = list(c._sub_batches(encoded.chunks))
    assert sorted(i for g in groups for i in g) == list(range(200)), "every chunk exactly once"
    for g in groups:
        widths = {len(encoded.chunks[i].ids) for i in g}
        assert len(widths) == 1, "a 3-token query padded to 42 tokens wastes 93% of the call"
        assert len(g) * max(widths) <= 600


def test_a_document_over_max_chunks_is_classified_on_its_first_chunks_only(tmp_path: Path) -> None:
    # Given chunks of 6 content tokens overlapping by 1 (stride is capped at a quarter of the window),
    # a cap of 3 chunks, and a document whose first 12 tokens say weather and the next 60 transfer
    bundle = load_bundle(build_bundle(tmp_path / "b", max_length=8))
    capped, full = Classifier(bundle, stride=2, max_chunks=3), Classifier(bundle, stride=2)
    doc = "rain " * 12 + "wire " * 60
    # When it is encoded, only its first 3 chunks are kept, and the truncation says what they cover
    encoded = capped.encode([doc, "rain wire"])
    assert encoded.owners == [0, 0, 0, 1]
    truncation = encoded.truncated[0]
    assert (truncation.chunks, list(encoded.truncated)) == (3, [0])
    assert doc[: truncation.chars].split() == ["rain"] * 12 + ["wire"] * 4, "3 chunks cover 6 + 5 + 5 tokens"
    # And the prediction is the first chunks' (weather), where the whole document's is transfer
    assert capped.predict([doc])[0].label == "weather"
    assert full.predict([doc])[0].label == "transfer"
    first3 = full.encode([doc])
    np.testing.assert_allclose(
        capped.predict_proba([doc]), full.proba_of(type(first3)(first3.chunks[:3], [0, 0, 0], 1)), rtol=1e-6
    )


def test_texts_within_max_chunks_are_untouched(tmp_path: Path) -> None:
    bundle = load_bundle(build_bundle(tmp_path / "b", max_length=8))
    texts = ["rain " * n + "hotel" for n in range(1, 12)]  # up to 3 chunks
    capped = Classifier(bundle, stride=2, max_chunks=3)
    assert capped.encode(texts).truncated == {}
    np.testing.assert_allclose(capped.predict_proba(texts), Classifier(bundle, stride=2).predict_proba(texts))


def test_the_tokenizer_never_sees_more_than_the_capped_head_of_a_huge_text(tmp_path: Path) -> None:
    # Tokenizing a whole 1 MB text only to keep its first chunks took 1.2 s with the shipped model
    c = Classifier(load_bundle(build_bundle(tmp_path / "b", max_length=8)), stride=2, max_chunks=3)
    seen: list[int] = []
    real = c._tok

    class Spy:
        def encode_batch(self, texts: list[str]) -> object:
            seen.extend(len(t) for t in texts)
            return real.encode_batch(texts)

    c._tok = Spy()  # type: ignore[assignment]
    encoded = c.encode(["weather " * 125_000])
    assert max(seen) <= 3 * 8 * 16, seen
    assert encoded.truncated[0].chunks == 3 and encoded.owners == [0, 0, 0]
