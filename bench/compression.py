"""What each output compression costs: bytes per routed record (on the broker's disk and on the
wire) and CPU per record (producing, and reading back with librdkafka), on a local Apache Kafka.

    python -m bench.compression [--data ../shared/data/clinc150/data_full.json] [--records 6000]

The records are the worker's own: routed values and headers that the default model's pipeline
writes for real queries (CLINC150's training texts when --data is given, else the dev kit's
sample sentences, each with a unique id), produced with the worker's producer settings
(idempotent, linger 5 ms) and only the codec changing. Two shapes of traffic:

- `spread`: keyed over 60 partitions (10 category topics x 6) at 1,000 records/s, about what
  one worker sustains: a producer batch holds one or two records, so each record is compressed
  nearly alone. This is the worker's normal case.
- `backlog`: one partition as fast as the producer goes: batches of hundreds of records, the
  best case for any codec (a replay, or a single hot category).

Figures are medians of `--runs` passes with the codecs interleaved, so that load from other
processes on the machine hits each alike. No assertion: read the table (bench/NOTES.md §10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.apache_kafka import LocalKafka
from devkit.traffic import OUT_OF_SCOPE, QUERIES
from worker.config import load_settings
from worker.pipeline import build_pipeline
from worker.records import Outgoing, Record

#: (name, producer settings): librdkafka's codecs; gzip at its default level (6) and at 1.
CODECS: list[tuple[str, dict[str, Any]]] = [
    ("none", {"compression.type": "none"}),
    ("gzip", {"compression.type": "gzip"}),
    ("gzip-1", {"compression.type": "gzip", "compression.level": 1}),
    ("snappy", {"compression.type": "snappy"}),
    ("lz4", {"compression.type": "lz4"}),
    ("zstd", {"compression.type": "zstd"}),
]
SPREAD_TOPICS, SPREAD_PARTITIONS, SPREAD_RATE = 10, 6, 1000.0


def texts(data: Path | None, n: int) -> list[str]:
    if data is None:
        pool = [q for qs in QUERIES.values() for q in qs] + OUT_OF_SCOPE
    else:
        doc = json.loads(data.read_text())
        pool = [row[0] for row in doc["train"]]  # training texts only: never the test split
    return [pool[i % len(pool)] for i in range(n)]


def routed_records(data: Path | None, n: int) -> list[Outgoing]:
    """The pipeline's outputs for `n` queries, as the worker would produce them."""
    pipeline = build_pipeline(load_settings(), shadow=False)
    out: list[Outgoing] = []
    batch = 256
    items = texts(data, n)
    for start in range(0, n, batch):
        records = [
            Record(
                orjson.dumps({"id": str(uuid.uuid4()), "text": t, "meta": {"tenant": "acme", "n": start + i}}),
                f"user-{(start + i) % 997}".encode(),
                [("tenant", b"acme"), ("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode())],
                "classify.in",
                0,
                start + i,
            )
            for i, t in enumerate(items[start : start + batch])
        ]
        out += pipeline.process(records).outgoing
    return out


def produce(bootstrap: str, records: list[Outgoing], codec: dict[str, Any], shape: str) -> dict[str, Any]:
    """Produce `records` in `shape`; the producer's CPU and wire bytes per record."""
    run = uuid.uuid4().hex[:8]
    if shape == "spread":
        topics = [f"cmp-{run}-{i}" for i in range(SPREAD_TOPICS)]
        parts = SPREAD_PARTITIONS
    else:
        topics, parts = [f"cmp-{run}"], 1
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(t, parts, 1) for t in topics]).values():
        f.result(30)
    stats: list[dict[str, Any]] = []
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "enable.idempotence": True,
            "statistics.interval.ms": 500,  # cumulative: the last report after the flush counts all
            "stats_cb": lambda s: stats.append(json.loads(s)),
            **codec,
        }
    )
    cpu0, started = time.process_time(), time.perf_counter()
    for i, r in enumerate(records):
        topic = topics[hash(r.detail) % len(topics)]
        producer.produce(topic, r.value, r.key, headers=list(r.headers))
        producer.poll(0)
        if shape == "spread":
            delay = started + (i + 1) / SPREAD_RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    assert producer.flush(60) == 0
    cpu = time.process_time() - cpu0
    stats.clear()
    deadline = time.monotonic() + 5
    while not stats and time.monotonic() < deadline:
        producer.poll(0.2)
    wire = _produce_bytes(stats[-1]) if stats else float("nan")
    return {"topics": topics, "producer_us": cpu / len(records) * 1e6, "wire_bytes": wire / len(records)}


def _produce_bytes(stats: dict[str, Any]) -> float:
    return float(sum(b.get("txbytes", 0) for b in stats.get("brokers", {}).values()))


def read_back(bootstrap: str, topics: list[str], n: int) -> float:
    """librdkafka's CPU per record to fetch and decompress everything (read_committed)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"cmp-{uuid.uuid4().hex[:8]}", "isolation.level": "read_committed"}
    )
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(t, p, 0) for t in topics for p in meta[t].partitions])
    cpu0, got = time.process_time(), 0
    deadline = time.monotonic() + 60
    while got < n and time.monotonic() < deadline:
        got += sum(1 for m in consumer.consume(1000, 0.5) if m.error() is None)
    cpu = time.process_time() - cpu0
    consumer.close()
    assert got == n, f"read {got} of {n}"
    return cpu / n * 1e6


def disk_bytes(kafka: LocalKafka, topics: list[str]) -> int:
    return sum(f.stat().st_size for t in topics for f in kafka.data_dir.glob(f"log/{t}-*/*.log"))


def rows(kafka: LocalKafka, records: list[Outgoing], runs: int) -> Iterator[dict[str, Any]]:
    for shape in ("spread", "backlog"):
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in CODECS}
        for _ in range(runs):
            for name, codec in CODECS:
                r: dict[str, Any] = produce(kafka.bootstrap, records, codec, shape)
                time.sleep(1)  # let the broker flush its segment files' sizes
                r["disk_bytes"] = disk_bytes(kafka, r["topics"]) / len(records)
                r["consumer_us"] = read_back(kafka.bootstrap, r.pop("topics"), len(records))
                results[name].append(r)
        for name, rs in results.items():
            yield {"shape": shape, "codec": name, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="CLINC150 data_full.json (training texts are used)")
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compression.json")
    args = parser.parse_args()
    records = [r for r in routed_records(args.data, args.records) if r.kind in ("routed", "fallback")]
    avg_value = statistics.mean(len(r.value or b"") for r in records)
    avg_headers = statistics.mean(sum(len(k) + len(v or b"") for k, v in r.headers) for r in records)
    print(f"{len(records)} routed records: value {avg_value:.0f} B, headers {avg_headers:.0f} B on average")
    with LocalKafka() as kafka:
        table = list(rows(kafka, records, args.runs))
    args.out.write_text(json.dumps({"records": len(records), "value_bytes": avg_value, "rows": table}, indent=1))
    print(f"\n{'shape':8} {'codec':7} {'disk B/rec':>10} {'wire B/rec':>10} {'produce µs/rec':>15} {'read µs/rec':>12}")
    for r in table:
        print(
            f"{r['shape']:8} {r['codec']:7} {r['disk_bytes']:10.0f} {r['wire_bytes']:10.0f}"
            f" {r['producer_us']:15.1f} {r['consumer_us']:12.1f}"
        )


if __name__ == "__main__":
    main()
