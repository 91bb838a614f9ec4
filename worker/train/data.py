"""Labelled text sets from CSV, JSONL or the CLINC150 json layout.

Kept free of torch so `classify-worker eval` works on a plain install.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from worker.errors import DataError

#: CLINC150's name for out-of-scope queries; its splits keep them apart as `oos_<split>`.
CLINC_OOS = "oos"
#: Share of each label a plain data file gives to the test split, and again to validation.
HELD_OUT = 0.1


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Columns:
    """Where a CSV header or a JSONL object keeps the text and the label (`--text-column`)."""

    text: str = "text"
    label: str = "label"


DEFAULT_COLUMNS = Columns()


@dataclass(frozen=True)
class Splits:
    """Train / validation / test lists. Validation is empty only after `--train-on-val`."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    #: Where the test and validation examples came from, in words, for the model card.
    test_from: str = "the data set's own test split"
    val_from: str = "the data set's own validation split"

    @property
    def labels(self) -> list[str]:
        """Sorted so label ids are stable across runs and machines."""
        return sorted({e.label for e in self.train})


def _from_pairs(rows: Sequence[object], source: Path, cols: Columns = DEFAULT_COLUMNS) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and isinstance(row.get(cols.text), str) and row.get(cols.label) is not None:
            out.append(Example(row[cols.text], str(row[cols.label])))
        elif isinstance(row, list | tuple) and len(row) == 2:
            out.append(Example(str(row[0]), str(row[1])))
        else:
            raise DataError(f"{source}: row {i} is neither {{{cols.text}, {cols.label}}} nor [text, label]")
    return out


def _read_clinc(path: Path) -> tuple[list[Example], list[Example], list[Example]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {e}") from e
    if not (isinstance(doc, dict) and "train" in doc):
        raise DataError(f"{path}: a .json data file must have the CLINC150 layout (train/val/test keys)")

    def split(name: str) -> list[Example]:
        return _from_pairs(doc.get(name, []), path) + _from_pairs(doc.get(f"oos_{name}", []), path)

    return split("train"), split("val"), split("test")


def _read_csv(path: Path, cols: Columns) -> list[Example]:
    """`newline=""` lets the csv module take CRLF and LF line ends alike; `utf-8-sig` drops the
    byte-order mark spreadsheet programs write, which would otherwise rename the first column."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {cols.text, cols.label} <= set(reader.fieldnames):
            raise DataError(
                f"{path}: CSV needs a header with {cols.text!r} and {cols.label!r} columns "
                f"(it has {reader.fieldnames}; name others with --text-column / --label-column)"
            )
        return [Example(r[cols.text], r[cols.label]) for r in reader]


def _read_jsonl(path: Path, cols: Columns) -> list[Example]:
    rows = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: {e}") from e
    return _from_pairs(rows, path, cols)


def load(
    path: str | Path,
    *,
    test_file: Path | None = None,
    cols: Columns = DEFAULT_COLUMNS,
    held_out_fraction: float = HELD_OUT,
    seed: int = 13,
) -> Splits:
    """Read a data file into train / validation / test.

    A split the file lacks is carved out of its training rows, seeded and stratified: the test
    split first (unless `test_file` gives one), then validation from what is left. The test
    split exists before any choice is made, so nothing tuned on validation can have seen it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix.lower() == ".json":
        train, val, test = _read_clinc(p)
    else:
        train, val, test = read_examples(p, cols), [], []
    carved = f"{held_out_fraction:.0%} of each label of {p.name}, carved out"
    test_from = "the data set's own test split"
    if test_file:
        test, test_from = read_examples(test_file, cols), f"{test_file.name} (--test)"
    elif not test:
        train, test = _stratified(train, held_out_fraction, seed)
        test_from = f"{carved} before anything else (seed {seed})"
    val_from = "the data set's own validation split"
    if not val:
        train, val = _stratified(train, held_out_fraction / (1 - held_out_fraction), seed + 1)
        val_from = f"{carved} after the test split (seed {seed + 1})"
    return Splits(train, val, test, test_from, val_from)


def read_examples(path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[Example]:
    """Every row of a CSV or JSONL file, unsplit: a `--test` file, or extra training examples
    such as `--add-train`'s, which must never leak into validation or test."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    examples = _read_csv(p, cols) if p.suffix.lower() == ".csv" else _read_jsonl(p, cols)
    if not examples:
        raise DataError(f"{p}: no examples")
    return examples


def with_extra_training(splits: Splits, extra: list[Example], source: Path) -> Splits:
    """`splits` with `extra` appended to its training split only. Extra labels must already
    exist in the data: a typo (`oss` for `oos`) would otherwise become a new label silently."""
    unknown = sorted({e.label for e in extra} - set(splits.labels))
    if unknown:
        raise DataError(f"{source}: labels not in the training data: {', '.join(unknown[:5])}")
    return replace(splits, train=splits.train + extra)


def _stratified(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held out): `fraction` of each label, at least one example of a label with three or
    more, so every label is measured; a label with fewer stays whole in `kept` to be learnt."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    kept: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_held = max(1, round(len(group) * fraction)) if len(group) > 2 else 0
        held += group[:n_held]
        kept += group[n_held:]
    return kept, held


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
