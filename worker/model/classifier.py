"""Batch text classification with `tokenizers` + onnxruntime, shaped for CPU throughput.

A micro-batch is tokenized once, sorted by token length and cut into sub-batches under a token
budget, so a single long document does not pad a hundred short queries to its length. Texts
longer than the model's limit are split into overlapping chunks whose probabilities are averaged
instead of being silently truncated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from worker.errors import InferenceError, ModelError
from worker.model.bundle import Bundle

#: Above this many rows a sub-batch stops paying off even for very short queries.
MAX_ROWS = 256


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    top_k: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tokenized batch: chunks in order, the text each belongs to, and how many texts."""

    chunks: list[Encoding]
    owners: list[int]
    texts: int


def usable_cores() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt graphs
        raise ModelError(f"{path}: cannot load ONNX model ({e})") from e


def _tokenizer(path: Path, max_length: int, stride: int) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ModelError(f"{path}: cannot load tokenizer ({e})") from e
    tok.no_padding()  # saved tokenizers often pad to a fixed length; we pad per sub-batch
    special = tok.num_special_tokens_to_add(is_pair=False)
    tok.enable_truncation(max_length=max_length, stride=min(stride, (max_length - special) // 4))
    return tok


def _softmax(logits: np.ndarray) -> np.ndarray:
    z: np.ndarray = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Classifier:
    """Thread-compatible, not thread-safe: one per worker loop (onnxruntime parallelizes inside)."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        token_budget: int = 8192,
        top_k: int = 3,
        stride: int = 32,
        threads: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.labels = bundle.labels
        self.top_k = min(top_k, len(bundle.labels))
        self.token_budget = max(token_budget, bundle.max_length)
        self._tok = _tokenizer(bundle.tokenizer_file, bundle.max_length, stride)
        self._session = _session(bundle.model_file, threads or usable_cores())
        self._inputs = {i.name for i in self._session.get_inputs()}
        if "input_ids" not in self._inputs:
            raise ModelError(f"{bundle.model_file}: graph has no 'input_ids' input ({sorted(self._inputs)})")
        self._output = self._session.get_outputs()[0].name
        self._check_labels()

    def _check_labels(self) -> None:
        try:
            probe = self._run(self._tok.encode_batch(["probe"]))
        except InferenceError as e:
            raise ModelError(f"{self.bundle.model_file}: fails on a probe input ({e})") from e
        if probe.shape[-1] != len(self.labels):
            raise ModelError(
                f"{self.bundle.path}: model has {probe.shape[-1]} outputs but config.json names "
                f"{len(self.labels)} labels"
            )

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        probs = self.predict_proba(texts)
        if not len(probs):
            return []
        k = self.top_k
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(probs, top, axis=1).tolist()
        labels = self.labels
        out = []
        for row_ids, row_scores in zip(top.tolist(), scores, strict=True):
            pairs = tuple((labels[i], float(s)) for i, s in zip(row_ids, row_scores, strict=True))
            out.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, one row per text (chunk probabilities averaged for long texts)."""
        return self.proba_of(self.encode(texts))

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenize once; long texts become several overlapping chunks."""
        chunks: list[Encoding] = []
        owners: list[int] = []
        for i, enc in enumerate(self._tok.encode_batch(list(texts))):
            chunks.append(enc)
            owners.append(i)
            for extra in enc.overflowing:
                chunks.append(extra)
                owners.append(i)
        return Encoded(chunks, owners, len(texts))

    def proba_of(self, encoded: Encoded) -> np.ndarray:
        """Inference only, on already tokenized texts (what `bench` measures as the ceiling)."""
        n, chunks = encoded.texts, encoded.chunks
        if n == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        chunk_probs = np.empty((len(chunks), len(self.labels)), dtype=np.float32)
        for idx in self._sub_batches(chunks):
            chunk_probs[idx] = self._run([chunks[i] for i in idx])
        if len(chunks) == n:
            return chunk_probs
        sums = np.zeros((n, len(self.labels)), dtype=np.float32)
        owner_arr = np.asarray(encoded.owners)
        np.add.at(sums, owner_arr, chunk_probs)
        sums /= np.bincount(owner_arr, minlength=n)[:, None]
        return sums

    def _sub_batches(self, chunks: list[Encoding]) -> Iterator[list[int]]:
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].ids))
        batch: list[int] = []
        for i in order:
            width = len(chunks[i].ids)  # the longest so far: `order` is ascending
            if batch and ((len(batch) + 1) * width > self.token_budget or len(batch) >= MAX_ROWS):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _run(self, encs: Sequence[Encoding]) -> np.ndarray:
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for row, e in enumerate(encs):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feeds = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = mask
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        try:
            (logits,) = self._session.run([self._output], feeds)
        except Exception as e:  # onnxruntime's errors are untyped
            raise InferenceError(f"onnxruntime failed on a batch of {len(encs)}: {e}") from e
        return _softmax(np.asarray(logits, dtype=np.float32))
