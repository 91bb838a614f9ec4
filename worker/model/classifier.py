"""Batch text classification with `tokenizers` + onnxruntime, shaped for CPU throughput.

A micro-batch is tokenized once, sorted by token length and cut into sub-batches under a token
budget, so a single long document does not pad a hundred short queries to its length. The
sub-batches run concurrently on single-threaded onnxruntime calls, one per core: for a small
encoder on short texts, onnxruntime's intra-op threads spend more time synchronising than
computing (measured in bench/NOTES.md). Texts longer than the model's limit are split into
overlapping chunks whose probabilities are averaged instead of being silently truncated; past
`max_chunks` chunks (`CW_LIMITS__MAX_CHUNKS`) a text is classified on its first chunks, and the
`Encoded.truncated` entry says how much of it that covers. A bundle with a Mahalanobis fit
(`worker.model.distance`) also gets each text's distance from the graph's pooled-embedding output,
averaged over its chunks like the probabilities.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from worker.config import DEFAULT_TOKEN_BUDGET
from worker.cpus import usable_cores
from worker.errors import InferenceError, ModelError
from worker.model import distance
from worker.model.bundle import Bundle

#: Above this many rows a sub-batch stops paying off even for very short queries.
MAX_ROWS = 256
#: The fixed cost of one onnxruntime call, in padded tokens: measured on 2 cores with the
#: default model, 16..64 all gave about twice the throughput of one call per micro-batch.
CALL_OVERHEAD_TOKENS = 32
#: A text over `max_chunks` is cut to this many characters per token of its chunks before it is
#: tokenized: English WordPiece averages ~4, so 16 keeps every chunk full for any ordinary text,
#: while tokenizing a whole 1 MB text only to drop most of its chunks took 1.2 s (measured here).
MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    top_k: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Inference:
    """What the model says about each text of a batch: class probabilities and, when the bundle
    has a Mahalanobis fit, the distance of its pooled embedding to the nearest in-scope label
    (both averaged over a long text's chunks)."""

    probs: np.ndarray
    distances: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Truncation:
    """A text longer than `max_chunks` chunks: it was classified on its first `chunks` chunks,
    which cover its first `chars` characters."""

    chunks: int
    chars: int


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tokenized batch: chunks in order, the text each belongs to, how many texts, and which
    texts were cut to `max_chunks` (by index)."""

    chunks: list[Encoding]
    owners: list[int]
    texts: int
    truncated: dict[int, Truncation] = field(default_factory=dict)

    def without(self, texts: Collection[int]) -> Encoded:
        """The same batch less some texts (indices renumbered), without tokenizing again."""
        if not texts:
            return self
        index = {old: new for new, old in enumerate(i for i in range(self.texts) if i not in texts)}
        kept = [(chunk, index[owner]) for chunk, owner in zip(self.chunks, self.owners, strict=True) if owner in index]
        truncated = {index[i]: t for i, t in self.truncated.items() if i in index}
        return Encoded([c for c, _ in kept], [o for _, o in kept], len(index), truncated)


def _session(path: Path) -> ort.InferenceSession:
    """Single-threaded calls: the classifier runs one per core concurrently (`run` is thread-safe)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis (the max subtracted first, so exp never overflows)."""
    z: np.ndarray = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Classifier:
    """One per worker loop; it runs up to `threads` inference calls at once on its own pool."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        top_k: int = 3,
        stride: int = 32,
        threads: int | None = None,
        max_chunks: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.max_chunks = max_chunks
        #: how much of a text is tokenized at most: enough for `max_chunks` full chunks
        self._max_chars = max_chunks * bundle.max_length * MAX_CHARS_PER_TOKEN if max_chunks else None
        self.labels = bundle.labels
        self.top_k = min(top_k, len(bundle.labels))
        self.token_budget = max(token_budget, bundle.max_length)
        self._tok = _tokenizer(bundle.tokenizer_file, bundle.max_length, stride)
        self._session = _session(bundle.model_file)
        self.threads = threads or usable_cores()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="infer") if self.threads > 1 else None
        self._inputs = {i.name for i in self._session.get_inputs()}
        if "input_ids" not in self._inputs:
            raise ModelError(f"{bundle.model_file}: graph has no 'input_ids' input ({sorted(self._inputs)})")
        self._output = self._session.get_outputs()[0].name
        outputs = {o.name for o in self._session.get_outputs()}
        self._embedding = distance.EMBEDDING_OUTPUT if distance.EMBEDDING_OUTPUT in outputs else None
        self.distance = self._distance_fit(bundle)
        self._check_labels()

    def _distance_fit(self, bundle: Bundle) -> distance.Mahalanobis | None:
        if bundle.distance_file is None:
            if bundle.routes.max_distance is not None:
                raise ModelError(f"{bundle.path}: routes.json sets 'max_distance', {distance.DISTANCE_FILE} is missing")
            return None
        if self._embedding is None:
            raise ModelError(
                f"{bundle.model_file}: {distance.DISTANCE_FILE} needs the graph output {distance.EMBEDDING_OUTPUT!r}"
            )
        return distance.load(bundle.distance_file, bundle.labels)

    def _check_labels(self) -> None:
        try:
            probe, embedding = self._run(self._tok.encode_batch(["probe"]))
        except InferenceError as e:
            raise ModelError(f"{self.bundle.model_file}: fails on a probe input ({e})") from e
        if probe.shape[-1] != len(self.labels):
            raise ModelError(
                f"{self.bundle.path}: model has {probe.shape[-1]} outputs but config.json names "
                f"{len(self.labels)} labels"
            )
        if self.distance is not None and (embedding is None or embedding.shape[-1] != self.distance.dim):
            width = None if embedding is None else embedding.shape[-1]
            raise ModelError(
                f"{self.bundle.path}: {distance.DISTANCE_FILE} was fitted on {self.distance.dim}-wide embeddings, "
                f"the graph's {distance.EMBEDDING_OUTPUT!r} is {width} wide"
            )

    def healthy(self) -> bool:
        """Whether a known-good text still classifies: tells a poison record from a broken
        classifier when a batch raises."""
        try:
            self.predict_proba(["probe"])
        except Exception:  # whatever broke the batch; the caller holds that exception
            return False
        return True

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return self.predictions(self.predict_proba(texts))

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        """Top label and top-k of each row of `predict_proba`'s output."""
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
        """Tokenize once; long texts become several overlapping chunks, at most `max_chunks`."""
        chunks: list[Encoding] = []
        owners: list[int] = []
        truncated: dict[int, Truncation] = {}
        cap, max_chars = self.max_chunks, self._max_chars
        heads = [text[:max_chars] for text in texts]
        for i, (text, enc) in enumerate(zip(texts, self._tok.encode_batch(heads), strict=True)):
            parts = [enc, *enc.overflowing]
            if cap is not None and (len(parts) > cap or len(text) > len(heads[i])):
                parts = parts[:cap]
                truncated[i] = Truncation(len(parts), max((end for p in parts for _, end in p.offsets), default=0))
            chunks += parts
            owners += [i] * len(parts)
        return Encoded(chunks, owners, len(texts), truncated)

    def proba_of(self, encoded: Encoded) -> np.ndarray:
        """Inference only, on already tokenized texts (what `bench` measures as the ceiling)."""
        return self.infer(encoded).probs

    def infer(self, encoded: Encoded) -> Inference:
        """Probabilities and, with a Mahalanobis fit, distances: one row per text of `encoded`."""
        probs, embeddings = self._chunk_outputs(encoded)
        distances = None
        if self.distance is not None and embeddings is not None:
            distances = self._per_text(encoded, self.distance.distances(embeddings)[:, None])[:, 0]
        return Inference(self._per_text(encoded, probs), distances)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The pooled embedding of each text (averaged over a long text's chunks): what a
        Mahalanobis fit is made from. Needs the graph output `EMBEDDING_OUTPUT`."""
        encoded = self.encode(texts)
        _, embeddings = self._chunk_outputs(encoded)
        if embeddings is None:
            raise ModelError(f"{self.bundle.model_file}: graph has no {distance.EMBEDDING_OUTPUT!r} output")
        return self._per_text(encoded, embeddings)

    def _chunk_outputs(self, encoded: Encoded) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (and embeddings, when the graph has them) of every chunk, in order."""
        chunks = encoded.chunks
        if not chunks:
            return np.zeros((0, len(self.labels)), dtype=np.float32), None
        groups = self._spread(list(self._sub_batches(chunks)))
        results: Iterable[tuple[np.ndarray, np.ndarray | None]]
        if self._pool is None or len(groups) == 1:
            results = map(self._run_group, [chunks] * len(groups), groups)
        else:
            results = self._pool.map(self._run_group, [chunks] * len(groups), groups)
        chunk_probs = np.empty((len(chunks), len(self.labels)), dtype=np.float32)
        chunk_embeddings: np.ndarray | None = None
        for idx, (probs, embeddings) in zip(groups, results, strict=True):
            chunk_probs[idx] = probs
            if embeddings is not None:
                if chunk_embeddings is None:
                    chunk_embeddings = np.empty((len(chunks), embeddings.shape[1]), dtype=np.float32)
                chunk_embeddings[idx] = embeddings
        return chunk_probs, chunk_embeddings

    @staticmethod
    def _per_text(encoded: Encoded, rows: np.ndarray) -> np.ndarray:
        """Chunk rows averaged per text (rows as they are when no text was split)."""
        n = encoded.texts
        if len(rows) == n:
            return rows
        sums = np.zeros((n, rows.shape[1]), dtype=rows.dtype)
        owner_arr = np.asarray(encoded.owners)
        np.add.at(sums, owner_arr, rows)
        sums /= np.bincount(owner_arr, minlength=n)[:, None]
        return sums

    def _sub_batches(self, chunks: list[Encoding]) -> Iterator[list[int]]:
        """Cut the length-sorted chunks into sub-batches that minimise padded tokens plus a fixed
        cost per inference call, under the token budget and row cap.

        One call per micro-batch pads 250 queries of 4..24 tokens to 24: measured here, that
        halved throughput. Dynamic programming over the distinct widths finds the cheapest cuts."""
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].ids))
        widths = [len(chunks[i].ids) for i in order]
        cuts = [0] + [i for i in range(1, len(widths)) if widths[i] != widths[i - 1]] + [len(widths)]
        best = [0.0] + [float("inf")] * (len(cuts) - 1)
        prev = [0] * len(cuts)
        for j in range(1, len(cuts)):
            width = widths[cuts[j] - 1]
            for i in range(j - 1, -1, -1):
                rows = cuts[j] - cuts[i]
                if rows > MAX_ROWS or rows * width > self.token_budget:
                    break  # earlier cuts only add rows
                cost = best[i] + CALL_OVERHEAD_TOKENS + rows * width
                if cost < best[j]:
                    best[j], prev[j] = cost, i
            if best[j] == float("inf"):  # one width alone exceeds the caps: split it by rows
                best[j], prev[j] = best[j - 1] + CALL_OVERHEAD_TOKENS + (cuts[j] - cuts[j - 1]) * width, j - 1
        groups = []
        j = len(cuts) - 1
        while j > 0:
            groups.append(order[cuts[prev[j]] : cuts[j]])
            j = prev[j]
        for group in reversed(groups):
            step = max(1, min(MAX_ROWS, self.token_budget // max(1, len(chunks[group[-1]].ids))))
            for start in range(0, len(group), step):
                yield group[start : start + step]

    def _spread(self, groups: list[list[int]]) -> list[list[int]]:
        """Largest sub-batches first, so the pool's threads finish together; a batch with fewer
        sub-batches than threads is split by rows, so a handful of queries still uses every core."""
        groups.sort(key=len, reverse=True)
        while self._pool is not None and len(groups) < self.threads and len(groups[0]) > 1:
            big = groups.pop(0)
            groups[:0] = [big[: len(big) // 2], big[len(big) // 2 :]]
            groups.sort(key=len, reverse=True)
        return groups

    def _run_group(self, chunks: list[Encoding], idx: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run([chunks[i] for i in idx])

    def _run(self, encs: Sequence[Encoding]) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, when the graph has that output, pooled embeddings of `encs`."""
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
        wanted = [self._output] if self._embedding is None else [self._output, self._embedding]
        try:
            logits, *embedding = self._session.run(wanted, feeds)
        except Exception as e:  # onnxruntime's errors are untyped
            raise InferenceError(f"onnxruntime failed on a batch of {len(encs)}: {e}") from e
        pooled = np.asarray(embedding[0], dtype=np.float32) if embedding else None
        return softmax(np.asarray(logits, dtype=np.float32)), pooled
