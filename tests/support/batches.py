"""The batch-independence check of issue 16: a text's probabilities (and Mahalanobis distance)
do not depend on which other texts share its inference call, so a replayed message takes the
same route."""

from __future__ import annotations

import random

import numpy as np

from worker.model import Classifier

#: Batch sizes tried, from pairs to the classifier's largest sub-batch.
BATCH_SIZES = (2, 3, 5, 8, 16, 31, 64, 128, 256)
#: "Equal" for float32 probabilities computed by the same kernels on the same inputs.
MAX_ABS_DIFF = 1e-6


def mixed_lengths(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """`n` texts: mostly `texts` as they are, one in twenty a long document made of many of them
    (longer than the model's limit, so the classifier chunks it)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(" ".join(rng.sample(texts, 60)) if i % 20 == 19 else texts[i % len(texts)])
    return out


def _scores(classifier: Classifier, texts: list[str]) -> np.ndarray:
    """Probabilities, and the Mahalanobis distance as a last column when the bundle has a fit."""
    inference = classifier.infer(classifier.encode(texts))
    if inference.distances is None:
        return inference.probs
    return np.hstack([inference.probs, inference.distances[:, None]])


def worst_batch_difference(classifier: Classifier, texts: list[str], seed: int = 0) -> float:
    """Largest |Δp| (and |Δ distance|, when the bundle has a Mahalanobis fit) between each text
    scored alone and the same text inside shuffled batches of every size in BATCH_SIZES."""
    rng = random.Random(seed)
    alone = np.vstack([_scores(classifier, [t]) for t in texts])
    worst = 0.0
    for size in BATCH_SIZES:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            scores = _scores(classifier, [texts[i] for i in idx])
            worst = max(worst, float(np.abs(scores - alone[idx]).max()))
    return worst
