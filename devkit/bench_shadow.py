"""What shadow mode costs: pipeline throughput and CPU per item, with and without a shadow bundle,
on the same texts in the same micro-batches as the engine (no broker: the cost is inference).

`python -m devkit.bench_shadow [--data CLINC150.json] [--shadow BUNDLE] [--repeats 5]`

The two configurations alternate within each repeat, so load from other processes on the machine
hits both alike; the figures are medians. The shadow defaults to the shipped bundle, the size a
real candidate usually has (the same architecture, retrained).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from devkit.bench import load_texts
from worker.config import BatchSettings, load_settings
from worker.model.bundle import default_bundle_path
from worker.pipeline import Pipeline, build_pipeline
from worker.records import Record

#: The engine's default micro-batch, so per-batch costs (tally, shadow call) weigh as in production.
BATCH = BatchSettings().max_items


def _batches(texts: list[str]) -> list[list[Record]]:
    records = [Record(orjson.dumps({"id": str(i), "text": t}), topic="bench", offset=i) for i, t in enumerate(texts)]
    return [records[i : i + BATCH] for i in range(0, len(records), BATCH)]


def _run(pipeline: Pipeline, batches: list[list[Record]]) -> tuple[float, float]:
    """Wall seconds and process CPU seconds for one pass over every batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        pipeline.process(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(texts: list[str], shadow: Path, repeats: int) -> dict[str, Any]:
    """Median items/s and CPU ms per item of the pipeline without and with `shadow`."""
    plain = build_pipeline(load_settings(), shadow=False)
    shadowed = build_pipeline(load_settings(shadow={"model_path": shadow}))
    batches = _batches(texts)
    _run(plain, batches[:2]), _run(shadowed, batches[:2])  # warm-up: sessions, thread pools, caches
    runs: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    for _ in range(repeats):
        runs["without"].append(_run(plain, batches))
        runs["with"].append(_run(shadowed, batches))
    out: dict[str, Any] = {"texts": len(texts), "batch": BATCH, "repeats": repeats, "shadow": str(shadow)}
    for name, samples in runs.items():
        out[name] = {
            "items_per_s": round(statistics.median(len(texts) / w for w, _ in samples), 1),
            "cpu_ms_per_item": round(statistics.median(1000 * c / len(texts) for _, c in samples), 3),
        }
    out["throughput_ratio"] = round(out["with"]["items_per_s"] / out["without"]["items_per_s"], 3)
    out["cpu_ratio"] = round(out["with"]["cpu_ms_per_item"] / out["without"]["cpu_ms_per_item"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="CLINC150 json (its test split); default: the demo queries")
    parser.add_argument("--shadow", type=Path, default=default_bundle_path(), help="shadow bundle directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000, help="texts per pass")
    args = parser.parse_args()
    texts, source = load_texts(args.data)
    result = measure(texts[: args.limit], args.shadow, args.repeats)
    print(json.dumps({"source": source, **result}, indent=2))


if __name__ == "__main__":
    main()
