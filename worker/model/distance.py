"""The Mahalanobis out-of-scope score: how far a text's pooled embedding lies from the nearest
in-scope label, in units of the spread the training texts show around their own label's mean.

A softmax is confident far from the training data as readily as near it; a distance on the
embedding the classifier head reads sees that a query lies outside every intent's cluster
(Lee et al., NeurIPS 2018; Podolskiy et al., AAAI 2021, on CLINC150). The fit (class means and
one covariance shared by every label, on the training split) is stored as a whitening matrix
`W` with `W Wᵀ = Σ⁻¹` and the whitened means, so scoring is one small matrix product and a
distance to each mean.

Batch independence: each text's row is multiplied on its own (a stack of 1-row products, not
one GEMM over the batch, whose kernel and summation order can depend on the row count), so a
text's distance is the same alone and in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from worker.errors import ModelError

#: In the bundle directory next to model.onnx; its bytes count in the bundle's version.
DISTANCE_FILE = "mahalanobis.npz"
#: The second output of the ONNX graph: the pooled embedding the classifier head reads.
EMBEDDING_OUTPUT = "pooled_embedding"


@dataclass(frozen=True)
class Mahalanobis:
    #: (dim, dim) float64: x ↦ x @ whitening maps the shared covariance to the identity.
    whitening: np.ndarray
    #: (labels, dim) float64: each in-scope label's training mean, whitened.
    means: np.ndarray
    #: The in-scope labels, in the rows' order.
    labels: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.whitening.shape[0])

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Per row of `embeddings`: the Mahalanobis distance to the nearest in-scope label's mean
        (|z - m|² expanded as |z|² - 2 z·m + |m|², in float64 so the expansion loses nothing)."""
        if not len(embeddings):
            return np.zeros(0, dtype=np.float64)
        rows = np.asarray(embeddings, dtype=np.float64)[:, None, :]
        z = np.matmul(rows, self.whitening)  # (n, 1, dim): one product per row
        cross = np.matmul(z, self.means.T)[:, 0, :]  # (n, labels)
        squared = np.square(z[:, 0, :]).sum(axis=1, keepdims=True) - 2 * cross + self._mean_norms
        nearest: np.ndarray = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
        return nearest

    @cached_property
    def _mean_norms(self) -> np.ndarray:
        norms: np.ndarray = np.square(self.means).sum(axis=1)[None, :]
        return norms


def save(path: Path, fit: Mahalanobis) -> None:
    np.savez(path, whitening=fit.whitening, means=fit.means, labels=np.array(fit.labels))


def load(path: Path, labels: tuple[str, ...]) -> Mahalanobis:
    """Read a fit written by `save`; a `ModelError` names what does not fit the bundle."""
    try:
        with np.load(path, allow_pickle=False) as doc:
            whitening, means, fit_labels = doc["whitening"], doc["means"], tuple(map(str, doc["labels"]))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: not a Mahalanobis fit ({e})") from e
    dim = whitening.shape[0] if whitening.ndim == 2 else -1
    if whitening.shape != (dim, dim) or means.shape != (len(fit_labels), dim):
        raise ModelError(f"{path}: whitening {whitening.shape} and means {means.shape} do not agree")
    unknown = set(fit_labels) - set(labels)
    if unknown:
        raise ModelError(f"{path}: labels not in config.json id2label: {sorted(unknown)[:5]}")
    return Mahalanobis(whitening.astype(np.float64), means.astype(np.float64), fit_labels)
