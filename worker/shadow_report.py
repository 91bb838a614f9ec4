"""`classify-worker shadow-report`: what a candidate model would change, read from the shadow topic.

Counts come from the per-batch tallies (every item both models scored, by live route → shadow
route), written in the same transactions as the disagreement records, so the rate and the matrix
are exact for everything committed; the disagreement records supply the examples. Reports are
per (live model, shadow model) pair, so a topic that outlived a model swap is not mixed up.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer
from pydantic import ValidationError

from worker.config import Settings
from worker.kafka_util import BoundedReader, offsets_at, topic_partitions, watermarks
from worker.messages import ShadowDisagreement, ShadowRecord, ShadowTally

log = logging.getLogger(__name__)

#: Messages per consume call while reading the topic to its end.
READ_BATCH = 1000
POLL_S = 0.2


@dataclass
class PairReport:
    """The shadow comparison of one live model with one candidate."""

    primary_model: str
    shadow_model: str
    items: int = 0
    unscored: int = 0
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: list[ShadowDisagreement] = field(default_factory=list)

    @property
    def disagreements(self) -> int:
        return sum(n for (a, b), n in self.routes.items() if a != b)

    @property
    def rate(self) -> float:
        return self.disagreements / self.items if self.items else 0.0

    def as_dict(self) -> dict[str, Any]:
        matrix: dict[str, dict[str, int]] = {}
        for (a, b), n in sorted(self.routes.items()):
            matrix.setdefault(a, {})[b] = n
        return {
            "primary_model": self.primary_model,
            "shadow_model": self.shadow_model,
            "items": self.items,
            "unscored": self.unscored,
            "disagreements": self.disagreements,
            "disagreement_rate": round(self.rate, 6),
            "matrix": matrix,
            "examples": [e.model_dump() for e in self.examples],
        }


def summarize(records: Iterable[ShadowDisagreement | ShadowTally], examples: int = 5) -> list[PairReport]:
    """One report per model pair, in order of first appearance."""
    reports: dict[tuple[str, str], PairReport] = {}
    for r in records:
        pair = (r.primary_model, r.shadow_model) if isinstance(r, ShadowTally) else (r.primary.model, r.shadow.model)
        report = reports.setdefault(pair, PairReport(*pair))
        if isinstance(r, ShadowTally):
            report.items += r.items
            report.unscored += r.unscored
            for primary, row in r.routes.items():
                for shadow, n in row.items():
                    report.routes[(primary, shadow)] += n
        elif len(report.examples) < examples:
            report.examples.append(r)
    return list(reports.values())


def format_report(report: PairReport) -> str:
    """A few lines for a terminal: totals, the from → to matrix, examples."""
    lines = [
        f"live {report.primary_model}  vs  shadow {report.shadow_model}",
        f"items {report.items} (unscored {report.unscored}), disagreements {report.disagreements} ({report.rate:.2%})",
    ]
    sources = sorted({a for a, _ in report.routes})
    targets = sorted({b for _, b in report.routes})
    width = max([len("live \\ shadow"), *map(len, sources)]) + 2
    cols = [max(len(t), 6) + 2 for t in targets]
    lines.append("live \\ shadow".ljust(width) + "".join(t.rjust(c) for t, c in zip(targets, cols, strict=True)))
    for a in sources:
        cells = "".join(str(report.routes.get((a, b)) or ".").rjust(c) for b, c in zip(targets, cols, strict=True))
        lines.append(a.ljust(width) + cells)
    if report.examples:
        lines.append("examples:")
    for e in report.examples:
        p, s = e.primary, e.shadow
        lines.append(
            f"  {e.id}: {p.route} -> {s.route}  (live {p.label} {p.category_score:.3f}, "
            f"shadow {s.label} {s.category_score:.3f})"
        )
    return "\n".join(lines)


def read_shadow(
    settings: Settings, topic: str, since_ms: int | None = None
) -> Iterator[ShadowDisagreement | ShadowTally]:
    """Every committed record of `topic` up to its end as of now (from `since_ms` if given)."""
    consumer = Consumer(
        {
            **settings.librdkafka_consumer(),
            "logger": logging.getLogger("librdkafka"),
            # must win: a throwaway group that commits nothing, and end-of-partition events
            "group.id": f"classify-shadow-report-{uuid.uuid4().hex[:8]}",
            "enable.partition.eof": True,
        }
    )
    try:
        tps = topic_partitions(consumer, topic)
        marks = watermarks(consumer, tps)
        high = {tp: hi for tp, (_, hi) in marks.items()}
        starts = {tp: lo for tp, (lo, _) in marks.items()}
        if since_ms is not None:
            starts = {tp: max(starts[tp], at) for tp, at in offsets_at(consumer, tps, since_ms, high).items()}
        reader = BoundedReader(consumer, starts, high)
        while not reader.done():
            for m in reader.take(READ_BATCH, POLL_S):
                try:
                    yield ShadowRecord.model_validate_json(m.value() or b"").root
                except ValidationError:
                    log.warning(
                        "not a shadow record; skipped", extra={"partition": m.partition(), "offset": m.offset()}
                    )
    finally:
        consumer.close()
