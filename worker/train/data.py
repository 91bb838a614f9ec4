"""Labelled text sets from CSV, JSONL or the CLINC150 json layout.

Kept free of torch so `classify-worker eval` works on a plain install.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from worker.errors import DataError

#: CLINC150's name for out-of-scope queries; its splits keep them apart as `oos_<split>`.
CLINC_OOS = "oos"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Splits:
    """Train / validation / test lists; validation or test may be empty for plain files."""

    train: list[Example]
    val: list[Example]
    test: list[Example]

    @property
    def labels(self) -> list[str]:
        """Sorted so label ids are stable across runs and machines."""
        return sorted({e.label for e in self.train})


def _from_pairs(rows: Sequence[object], source: Path) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row.get("label") is not None:
            out.append(Example(row["text"], str(row["label"])))
        elif isinstance(row, list | tuple) and len(row) == 2:
            out.append(Example(str(row[0]), str(row[1])))
        else:
            raise DataError(f"{source}: row {i} is neither {{text, label}} nor [text, label]")
    return out


def _read_clinc(doc: dict[str, list[list[str]]], source: Path) -> Splits:
    def split(name: str) -> list[Example]:
        return _from_pairs(doc.get(name, []), source) + _from_pairs(doc.get(f"oos_{name}", []), source)

    return Splits(split("train"), split("val"), split("test"))


def _read_csv(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: CSV needs a header with 'text' and 'label' columns")
        return [Example(r["text"], r["label"]) for r in reader]


def _read_jsonl(path: Path) -> list[Example]:
    rows = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: {e}") from e
    return _from_pairs(rows, path)


def load(path: str | Path, val_fraction: float = 0.1, seed: int = 13) -> Splits:
    """Read a data file; plain CSV/JSONL files get a seeded, stratified validation split."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: {e}") from e
        if isinstance(doc, dict) and "train" in doc:
            return _read_clinc(doc, p)
        raise DataError(f"{p}: a .json data file must have the CLINC150 layout (train/val/test keys)")
    return _split(read_examples(p), val_fraction, seed)


def read_examples(path: str | Path) -> list[Example]:
    """Every row of a CSV or JSONL file, unsplit: extra training examples such as
    `--add-train`'s, which must never leak into validation or test."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    examples = _read_csv(p) if p.suffix.lower() == ".csv" else _read_jsonl(p)
    if not examples:
        raise DataError(f"{p}: no examples")
    return examples


def with_extra_training(splits: Splits, extra: list[Example], source: Path) -> Splits:
    """`splits` with `extra` appended to its training split only. Extra labels must already
    exist in the data: a typo (`oss` for `oos`) would otherwise become a new label silently."""
    unknown = sorted({e.label for e in extra} - set(splits.labels))
    if unknown:
        raise DataError(f"{source}: labels not in the training data: {', '.join(unknown[:5])}")
    return Splits(splits.train + extra, splits.val, splits.test)


def _split(examples: list[Example], val_fraction: float, seed: int) -> Splits:
    import random

    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    train: list[Example] = []
    val: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = int(len(group) * val_fraction) if len(group) > 2 else 0
        val += group[:n_val]
        train += group[n_val:]
    return Splits(train, val, [])


def load_categories(path: str | Path) -> dict[str, str]:
    """Label → category from `{label: category}` or CLINC's `{category: [labels]}` layout."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: {e}") from e
    if not isinstance(doc, dict):
        raise DataError(f"{p}: expected a JSON object")
    out: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, list):
            out.update({str(label): key for label in value})
        elif isinstance(value, str):
            out[key] = value
        else:
            raise DataError(f"{p}: {key!r} maps to neither a category name nor a list of labels")
    return out
