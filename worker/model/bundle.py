"""Load and validate a model bundle: `model.onnx`, `tokenizer.json`, `config.json` (with
`id2label`), an optional `routes.json` (label → category, which out-of-scope score and its
threshold, fallback labels) and an optional `mahalanobis.npz` (`worker.model.distance`).

Everything that can be wrong with a bundle is found here, at start, as a `ModelError` that
names the file — never as a shape error in the middle of a batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ModelError
from worker.model.distance import DISTANCE_FILE

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
ROUTES_FILE = "routes.json"
#: The out-of-scope scores `routes.json` can name: the predicted category's probability (compared
#: with `threshold`), the Mahalanobis distance (compared with `max_distance`), or both, where
#: either one sends an item to the fallback topic.
SCORES = ("category", "mahalanobis", "category+mahalanobis")
#: Used when config.json names no limit; BERT-family position tables have 512 entries.
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class RouteTable:
    """What `routes.json` says; every field optional so a bare Optimum export still loads."""

    categories: dict[str, str] = field(default_factory=dict)
    threshold: float = 0.0
    fallback_labels: frozenset[str] = frozenset()
    #: An item whose Mahalanobis distance exceeds this falls back; None: the distance is not used.
    max_distance: float | None = None

    @property
    def score(self) -> str:
        """Which of `SCORES` decides fallback, besides the fallback labels."""
        if self.max_distance is None:
            return "category"
        return "mahalanobis" if self.threshold == 0.0 else "category+mahalanobis"


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    #: First 12 hex digits of a SHA-256 over the files that decide predictions.
    version: str
    labels: tuple[str, ...]
    max_length: int
    routes: RouteTable

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def distance_file(self) -> Path | None:
        """The Mahalanobis fit, when the bundle has one."""
        file = self.path / DISTANCE_FILE
        return file if file.is_file() else None


def default_bundle_path() -> Path:
    """The bundle shipped as package data."""
    return Path(__file__).resolve().parent / "default"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e


def _labels(config: Any, path: Path) -> tuple[str, ...]:
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(id2label, dict) or not id2label:
        raise ModelError(f"{path}: needs a non-empty 'id2label' object")
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError as e:
        raise ModelError(f"{path}: id2label keys must be integers") from e
    if ids != list(range(len(ids))):
        raise ModelError(f"{path}: id2label ids must be 0..{len(ids) - 1} without gaps")
    return tuple(str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids)


def _routes(path: Path, labels: tuple[str, ...]) -> RouteTable:
    if not path.exists():
        return RouteTable()
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: expected a JSON object")
    categories = doc.get("categories", {})
    threshold = doc.get("threshold", 0.0)
    fallback = doc.get("fallback_labels", [])
    if not isinstance(categories, dict) or not all(isinstance(v, str) for v in categories.values()):
        raise ModelError(f"{path}: 'categories' must map labels to category names")
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ModelError(f"{path}: 'threshold' must be a number in [0, 1]")
    if not isinstance(fallback, list):
        raise ModelError(f"{path}: 'fallback_labels' must be a list")
    unknown = (set(categories) | set(fallback)) - set(labels)
    if unknown:
        raise ModelError(f"{path}: labels not in config.json id2label: {sorted(unknown)[:5]}")
    table = RouteTable(dict(categories), float(threshold), frozenset(map(str, fallback)), _max_distance(doc, path))
    if doc.get("score", table.score) != table.score:
        raise ModelError(
            f"{path}: 'score' says {doc.get('score')!r} but 'threshold' and 'max_distance' make it {table.score!r}"
        )
    return table


def _max_distance(doc: dict[str, Any], path: Path) -> float | None:
    value = doc.get("max_distance")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelError(f"{path}: 'max_distance' must be a positive number")
    return float(value)


def _version(path: Path) -> str:
    digest = hashlib.sha256()
    for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE, ROUTES_FILE, DISTANCE_FILE):
        file = path / name
        if file.exists():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Validate a bundle directory's files and return its description (the ONNX graph itself is
    checked by `Classifier`, which loads it)."""
    root = Path(path) if path is not None else default_bundle_path()
    if not root.is_dir():
        raise ModelError(f"{root}: model bundle directory does not exist")
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if not (root / required).is_file():
            raise ModelError(f"{root / required}: missing")
    config = _read_json(root / CONFIG_FILE)
    labels = _labels(config, root / CONFIG_FILE)
    max_length = int(config.get("max_length") or config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    name = str(config.get("name") or root.name)
    return Bundle(
        path=root,
        name=name,
        version=_version(root),
        labels=labels,
        max_length=min(max_length, DEFAULT_MAX_LENGTH),
        routes=_routes(root / ROUTES_FILE, labels),
    )
