"""`make bench` (`python -m devkit bench`): model-only ceiling, worker end to end, the transformers baseline,
latency under load, and cost — in one process tree and one sitting, on the same texts.

Figures are ratios within one run on one machine; absolute numbers move with the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from devkit.ports import free_port
from devkit.tansu import DevBroker
from devkit.toolkit import paced, read_outputs
from devkit.traffic import QUERIES
from worker.config import Settings, load_settings
from worker.engines.confluent import ConfluentEngine
from worker.model import Classifier, default_bundle_path, load_bundle
from worker.model.classifier import usable_cores
from worker.observability import PrometheusHooks
from worker.pipeline import build_pipeline

#: AWS EC2 on-demand, us-east-1, Linux: c7i.large (2 vCPU) at $0.08925/h → per vCPU-hour.
DEFAULT_VCPU_HOUR_USD = 0.08925 / 2
BATCH_SIZES = (1, 4, 16, 64, 256)
LOAD_FRACTIONS = (0.25, 0.5, 0.75)
BASELINE_BATCH = 64
#: The latency runs' downstream reader fetches lazily: on a 2-core machine its fetches at the
#: default 10 ms cost the co-located broker CPU the worker needs (measured: broker CPU -35%).
READER_FETCH_WAIT_MS = 100


@dataclass
class Results:
    machine: dict[str, Any]
    texts: int
    source: str
    figures: dict[str, Any] = field(default_factory=dict)


def _median_rate(n: int, fn: Callable[[], object], repeats: int = 3) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def load_texts(data: Path | None) -> tuple[list[str], str]:
    if data is not None and data.is_file():
        from worker.train.data import load

        splits = load(data)
        return [e.text for e in splits.test or splits.val or splits.train], f"{data.name} test split"
    texts = [q for qs in QUERIES.values() for q in qs]
    return texts * (2000 // len(texts) + 1), "demo queries (repeated)"


def model_only(classifier: Classifier, texts: list[str]) -> dict[str, Any]:
    encoded = classifier.encode(texts)
    ceiling = _median_rate(len(texts), lambda: classifier.proba_of(encoded))
    with_tokenizer = _median_rate(len(texts), lambda: classifier.predict_proba(texts))
    by_batch = {}
    for size in BATCH_SIZES:
        chunks = [texts[i : i + size] for i in range(0, min(len(texts), max(size * 20, 512)), size)]

        def calls(chunks: list[list[str]] = chunks) -> None:
            for chunk in chunks:
                classifier.predict_proba(chunk)

        by_batch[size] = _median_rate(sum(len(c) for c in chunks), calls)
    return {"pretokenized_items_per_s": ceiling, "items_per_s": with_tokenizer, "items_per_s_by_batch": by_batch}


def _topics_env(bootstrap: str, tag: str) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{tag}",
            "instance_id": f"bench-{tag}",
            "session_timeout_ms": 6000,
            "consumer_config": dict(DevBroker.CLIENT_TUNING),
        },
        "topics": {
            "input": f"bench-{tag}.in",
            "prefix": f"bench-{tag}.",
            "fallback": f"bench-{tag}.fallback",
            "dlq": f"bench-{tag}.dlq",
        },
        "metrics": {"enabled": False},
    }


def _produce(bootstrap: str, topic: str, texts: list[str]) -> int:
    """The backlog: every text, as fast as the producer goes."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, text in enumerate(texts):
        while True:
            try:
                producer.produce(topic, value=json.dumps({"id": f"b{i}", "text": text}).encode(), key=f"b{i}".encode())
                break
            except BufferError:  # local queue full
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    return len(texts)


def worker_end_to_end(bootstrap: str, texts: list[str], bundle: Path) -> dict[str, Any]:
    """Produce every text first, then let one in-process engine drain them: consume → commit."""
    settings = load_settings(**_topics_env(bootstrap, uuid.uuid4().hex[:8]), model={"path": bundle})
    engine = ConfluentEngine(settings, build_pipeline(settings), PrometheusHooks(CollectorRegistry()))
    n = _produce(bootstrap, settings.topics.input, texts)
    cpu_before = time.process_time()
    engine.run(max_messages=n, idle_exit_s=60)
    cpu_s = time.process_time() - cpu_before
    assert engine.first_record_at is not None and engine.last_commit_at is not None
    wall = engine.last_commit_at - engine.first_record_at
    return {
        "messages": n,
        "items_per_s": n / wall,
        "seconds": wall,
        "cpu_s_per_1000": 1000 * cpu_s / n,
        "delivery": settings.delivery,
        "batch_max_items": settings.batch.max_items,
    }


def faust_end_to_end(bootstrap: str, texts: list[str], bundle: Path, workdir: Path) -> dict[str, Any] | None:
    """The Faust engine as a subprocess on the same backlog: from its partition assignment to the
    last routed message a read_committed reader sees (it has no in-process timestamps)."""
    try:
        import faust  # noqa: F401
    except ImportError:
        return None
    tag, env, settings, outputs = _fresh_deployment(bootstrap, bundle)
    n = _produce(bootstrap, settings.topics.input, texts)
    log = workdir / f"faust-{tag}.log"
    with _worker_process(env, log, "--engine", "faust"):
        _wait_assigned(log)
        started = time.time()
        seen = read_outputs(bootstrap, outputs, expect=n, timeout_s=300, quiet_s=0.5)
    seconds = max(o.seen_at for o in seen) - started
    return {"messages": n, "received": len(seen), "items_per_s": n / max(seconds, 1e-9), "seconds": seconds}


def _fresh_deployment(bootstrap: str, bundle: Path) -> tuple[str, dict[str, str], Settings, list[str]]:
    """Run-specific topics, created: (tag, the worker subprocess's env, settings, output topics)."""
    from worker.routing import Router
    from worker.topics import ensure_for

    tag = uuid.uuid4().hex[:8]
    conf = _topics_env(bootstrap, tag)
    settings = load_settings(**conf, model={"path": bundle})
    b = load_bundle(bundle)
    router = Router(b.routes, b.labels, settings)
    ensure_for(settings, router)
    return tag, _worker_env(bootstrap, conf, bundle), settings, [*router.topics(), settings.topics.dlq]


def _worker_env(bootstrap: str, conf: dict[str, Any], bundle: Path) -> dict[str, str]:
    return {
        "CW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CW_KAFKA__GROUP_ID": conf["kafka"]["group_id"],
        "CW_KAFKA__INSTANCE_ID": conf["kafka"]["instance_id"],
        "CW_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "CW_KAFKA__CONSUMER_CONFIG": json.dumps(DevBroker.CLIENT_TUNING),
        "CW_MODEL__PATH": str(bundle),
        "CW_METRICS__PORT": str(free_port()),
        **{f"CW_TOPICS__{k.upper()}": v for k, v in conf["topics"].items()},
    }


@contextlib.contextmanager
def _worker_process(settings_env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "worker.cli", "run", *args],
            env={**os.environ, **settings_env},
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()


def latency_under_load(
    bootstrap: str,
    texts: list[str],
    bundle: Path,
    capacity: float,
    seconds: float,
    workdir: Path,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """A worker subprocess, a fixed-rate producer, a read_committed reader, at several loads.

    Latency is the routed message's timestamp minus the inbound message's (both set when the
    message is produced, as the issue defines it), and, separately, until a read_committed
    consumer holds the routed message (adds the transaction commit and the reader's fetch)."""
    return {
        str(fraction): _latency_at(
            bootstrap,
            texts,
            bundle,
            capacity * fraction,
            seconds if fraction == 0.5 else max(10.0, seconds / 3),
            workdir,
            broker_pid,
        )
        for fraction in LOAD_FRACTIONS
    }


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_snapshot(worker_pid: int, broker_pid: int | None) -> dict[str, float | None]:
    return {
        "worker": _cpu_seconds(worker_pid),
        "broker": _cpu_seconds(broker_pid),
        "load_generator": time.process_time(),  # this process: the producer thread and the reader
    }


def _latency_at(
    bootstrap: str,
    texts: list[str],
    bundle: Path,
    rate: float,
    duration: float,
    workdir: Path,
    broker_pid: int | None,
) -> dict[str, Any]:
    """Also where the 2 cores went during the run: worker, co-located broker, load generator."""
    tag, env, settings, outputs = _fresh_deployment(bootstrap, bundle)
    log = workdir / f"latency-{tag}.log"
    sent_at: dict[bytes, float] = {}
    with _worker_process(env, log) as proc:
        _wait_assigned(log)
        cpu_before, started = _cpu_snapshot(proc.pid, broker_pid), time.monotonic()
        producer = threading.Thread(
            target=lambda: sent_at.update(_timed_produce(bootstrap, settings.topics.input, texts, rate, duration))
        )
        producer.start()
        seen = read_outputs(
            bootstrap,
            outputs,
            expect=int(rate * duration * 0.99),
            timeout_s=duration + 60,
            quiet_s=2.0,
            fetch_wait_ms=READER_FETCH_WAIT_MS,
        )
        producer.join()
        cpu_after, wall = _cpu_snapshot(proc.pid, broker_pid), time.monotonic() - started
    cores: dict[str, float | None] = {}
    for name, before in cpu_before.items():
        after = cpu_after[name]
        cores[name] = None if before is None or after is None else (after - before) / wall
    mine = [(sent_at[o.key], o) for o in seen if o.key in sent_at and o.timestamp_ms is not None]
    routed = np.array([(o.timestamp_ms or 0) / 1000 - sent for sent, o in mine]) * 1000
    visible = np.array([o.seen_at - sent for sent, o in mine]) * 1000
    return {
        "rate_per_s": rate,
        "seconds": duration,
        "messages": len(sent_at),
        "received": len(seen),
        **{f"p{q}_ms": float(np.percentile(routed, q)) for q in (50, 95, 99)},
        **{f"visible_p{q}_ms": float(np.percentile(visible, q)) for q in (50, 95, 99)},
        "cores_used": cores,
    }


def _wait_assigned(log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and "partitions assigned" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"bench worker never got partitions:\n{log.read_text()[-2000:]}")


def _timed_produce(bootstrap: str, topic: str, texts: list[str], rate: float, duration: float) -> dict[bytes, float]:
    """librdkafka's default linger (5 ms), as a producer fleet would run; each message carries
    its send time as its timestamp, in milliseconds like every Kafka timestamp."""
    producer = Producer({"bootstrap.servers": bootstrap})
    sent: dict[bytes, float] = {}
    for i in paced(rate, duration_s=duration):
        key = f"l{i}".encode()
        now_ms = int(time.time() * 1000)
        value = json.dumps({"id": key.decode(), "text": texts[i % len(texts)]}).encode()
        producer.produce(topic, key=key, value=value, timestamp=now_ms)
        sent[key] = now_ms / 1000
        producer.poll(0)
    producer.flush(30)
    return sent


def transformers_baseline(model_dir: Path, texts: list[str]) -> dict[str, Any]:
    """What a user would otherwise deploy: the same fine-tuned weights in PyTorch through
    `transformers.pipeline("text-classification")`, batch size 64, all cores."""
    import torch
    from transformers import AutoTokenizer, pipeline

    torch.set_num_threads(usable_cores())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    clf = pipeline("text-classification", model=str(model_dir), tokenizer=tokenizer, device=-1, dtype=torch.float32)
    sample = texts[: min(len(texts), 2000)]
    rate = _median_rate(len(sample), lambda: clf(sample, batch_size=BASELINE_BATCH, truncation=True), repeats=1)
    return {"items_per_s": rate, "texts": len(sample), "batch_size": BASELINE_BATCH}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": usable_cores(), "python": platform.python_version(), "platform": platform.platform()}


def run_bench(
    data: Path | None,
    out_dir: Path,
    baseline_model: Path | None,
    latency_s: float,
    vcpu_hour_usd: float,
    console: Console | None = None,
) -> Results:
    console = console or Console()
    texts, source = load_texts(data)
    bundle_path = default_bundle_path()
    results = Results(machine(), len(texts), source)
    f = results.figures
    console.print(
        f"[bold]bench[/] {len(texts)} texts ({source}) on {results.machine['cpu']}, {results.machine['cores']} cores"
    )
    classifier = Classifier(load_bundle(bundle_path))
    f["model_only"] = model_only(classifier, texts)
    console.print(f"model-only: {f['model_only']['pretokenized_items_per_s']:.0f} items/s (pre-tokenized)")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="classify-bench-")))
        external = os.environ.get("CW_KAFKA__BOOTSTRAP_SERVERS")
        broker = None if external else stack.enter_context(DevBroker(log_file=workdir / "broker.log"))
        bootstrap = external or broker.bootstrap  # type: ignore[union-attr]
        f["worker"] = worker_end_to_end(bootstrap, texts, bundle_path)
        console.print(f"worker end to end: {f['worker']['items_per_s']:.0f} items/s")
        faust_figure = faust_end_to_end(bootstrap, texts, bundle_path, workdir)
        if faust_figure:
            f["faust"] = faust_figure
            console.print(f"faust engine end to end: {faust_figure['items_per_s']:.0f} items/s")
        f["latency"] = latency_under_load(
            bootstrap,
            texts,
            bundle_path,
            f["worker"]["items_per_s"],
            latency_s,
            workdir,
            broker.pid if broker else None,
        )
        console.print(f"latency at 50% load: p99 {f['latency']['0.5']['p99_ms']:.0f} ms")
    if baseline_model is not None and baseline_model.is_dir():
        f["baseline"] = transformers_baseline(baseline_model, texts)
        console.print(f"transformers pipeline: {f['baseline']['items_per_s']:.0f} items/s")
    cpu_s = f["worker"]["cpu_s_per_1000"] / 1000
    f["cost"] = {
        "cpu_s_per_1000": f["worker"]["cpu_s_per_1000"],
        "vcpu_hour_usd": vcpu_hour_usd,
        "usd_per_million": cpu_s * 1e6 / 3600 * vcpu_hour_usd,
    }
    f["ratios"] = {
        "worker_over_model_only": f["worker"]["items_per_s"] / f["model_only"]["pretokenized_items_per_s"],
        "model_only_over_transformers": (f["model_only"]["pretokenized_items_per_s"] / f["baseline"]["items_per_s"])
        if "baseline" in f
        else None,
    }
    write_results(results, out_dir)
    console.print(summary_table(results))
    return results


def summary_table(r: Results) -> Table:
    f = r.figures
    t = Table(title=f"make bench — {r.machine['cpu']}, {r.machine['cores']} cores")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_row("model-only, pre-tokenized (items/s)", f"{f['model_only']['pretokenized_items_per_s']:.0f}", "")
    t.add_row("model-only, with tokenizer (items/s)", f"{f['model_only']['items_per_s']:.0f}", "")
    t.add_row("worker end to end (items/s)", f"{f['worker']['items_per_s']:.0f}", "")
    t.add_row("worker ÷ model-only", f"{f['ratios']['worker_over_model_only']:.2f}", "≥ 0.90")
    if "faust" in f:
        t.add_row("faust engine end to end (items/s, at-least-once)", f"{f['faust']['items_per_s']:.0f}", "")
    if "baseline" in f:
        t.add_row("transformers pipeline, batch 64 (items/s)", f"{f['baseline']['items_per_s']:.0f}", "")
        t.add_row("model-only ÷ transformers", f"{f['ratios']['model_only_over_transformers']:.1f}", "≥ 5.0")
    for frac, lat in f["latency"].items():
        t.add_row(
            f"latency at {float(frac):.0%} load ({lat['rate_per_s']:.0f}/s) p50/p95/p99 (ms)",
            f"{lat['p50_ms']:.0f} / {lat['p95_ms']:.0f} / {lat['p99_ms']:.0f}",
            "p99 ≤ 50" if frac == "0.5" else "",
        )
    for frac, lat in f["latency"].items():
        t.add_row(
            f"  … until a read_committed reader has it, {float(frac):.0%} load",
            f"{lat['visible_p50_ms']:.0f} / {lat['visible_p95_ms']:.0f} / {lat['visible_p99_ms']:.0f}",
            "",
        )
    cores = f["latency"].get("0.5", {}).get("cores_used", {})
    if cores and None not in cores.values():
        t.add_row(
            "cores used at 50% load: worker / broker / load generator",
            " / ".join(f"{cores[k]:.2f}" for k in ("worker", "broker", "load_generator")),
            "",
        )
    t.add_row("worker CPU-seconds per 1,000 items", f"{f['cost']['cpu_s_per_1000']:.2f}", "")
    t.add_row(f"$ per 1M at ${f['cost']['vcpu_hour_usd']:.4f}/vCPU-h", f"{f['cost']['usd_per_million']:.4f}", "≤ 0.02")
    return t


def write_results(r: Results, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"machine": r.machine, "texts": r.texts, "source": r.source, **r.figures}
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    console = Console(record=True, width=110, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(summary_table(r))
    (out_dir / "latest.md").write_text("```\n" + console.export_text() + "```\n")
    _plots(r, out_dir)


def _plots(r: Results, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    f = r.figures
    sizes = sorted(int(k) for k in f["model_only"]["items_per_s_by_batch"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(sizes, [f["model_only"]["items_per_s_by_batch"][s] for s in sizes], marker="o", label="classifier")
    ax.axhline(f["worker"]["items_per_s"], color="tab:green", linestyle="--", label="worker end to end")
    if "baseline" in f:
        ax.axhline(f["baseline"]["items_per_s"], color="tab:red", linestyle=":", label="transformers pipeline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("texts per call")
    ax.set_ylabel("items/s")
    ax.set_title("Throughput vs batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_batch.png", dpi=120)
    plt.close(fig)
    loads = sorted(f["latency"], key=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for pct in ("p50", "p95", "p99"):
        ax.plot([float(x) * 100 for x in loads], [f["latency"][x][f"{pct}_ms"] for x in loads], marker="o", label=pct)
    ax.plot(
        [float(x) * 100 for x in loads],
        [f["latency"][x]["visible_p99_ms"] for x in loads],
        linestyle="--",
        marker="x",
        label="p99, read_committed reader",
    )
    ax.set_yscale("log")
    ax.set_xlabel("load (% of measured worker capacity)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency percentiles vs load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_load.png", dpi=120)
    plt.close(fig)
