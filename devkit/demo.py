"""`make demo` (`python -m devkit demo`): the whole product in one command, on an embedded broker.

Starts the broker (or uses `CW_KAFKA__BOOTSTRAP_SERVERS`), creates the topics, starts a real
`classify-worker run` subprocess, sends the demo traffic at a steady rate (latency) and then as
a backlog (throughput), reads every output topic with read_committed like a downstream consumer
would, and prints what went where.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devkit.ports import free_port
from devkit.tansu import DevBroker
from devkit.toolkit import Output, end_offsets, produce, read_outputs, running_worker
from devkit.traffic import DemoMessage, messages
from worker.config import load_settings
from worker.model.bundle import load_bundle
from worker.routing import Router
from worker.topics import ensure_for

#: Steady phase rate: well under one worker's capacity, so latency is not queueing delay.
STEADY_RATE_PER_S = 100
#: Backlog phase: the demo traffic repeated, produced at once, to show throughput.
BACKLOG_ROUNDS = 8
READY_TIMEOUT_S = 90.0


def _produce(bootstrap: str, topic: str, batch: list[DemoMessage], rate_per_s: float | None) -> dict[bytes, float]:
    """Send the messages (at a fixed rate, or at once); return key → send time."""
    outbound = [(m.key, m.value, [("source", b"demo")]) for m in batch]
    return produce(bootstrap, topic, outbound, rate_per_s=rate_per_s).at


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready within {READY_TIMEOUT_S} s:\n{log.read_text()[-2000:]}")


def _phase(
    console: Console,
    title: str,
    bootstrap: str,
    topics: list[str],
    input_topic: str,
    batch: list[DemoMessage],
    rate: float | None,
) -> tuple[list[Output], dict[bytes, float]]:
    columns = (TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(title, total=len(batch))
        start = end_offsets(bootstrap, topics)
        sent: dict[bytes, float] = {}
        producer = threading.Thread(target=lambda: sent.update(_produce(bootstrap, input_topic, batch, rate)))
        producer.start()
        seen = read_outputs(
            bootstrap, topics, len(batch), timeout_s=120, on_message=lambda _m: progress.advance(task), start=start
        )
        producer.join()
    return seen, sent


def run_demo(console: Console | None = None) -> int:
    console = console or Console()
    external = os.environ.get("CW_KAFKA__BOOTSTRAP_SERVERS")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="classify-demo-")))
        if external:
            bootstrap = external
        else:
            console.print("[bold]starting[/] the embedded Kafka-protocol broker (Tansu)…")
            bootstrap = stack.enter_context(DevBroker(log_file=workdir / "broker.log")).bootstrap
        tag = uuid.uuid4().hex[:6]
        names = {"input": "classify.in", "prefix": "routed.", "fallback": "routed.fallback", "dlq": "classify.dlq"}
        if external:  # never mix with real traffic on someone's cluster
            names = {k: f"demo-{tag}.{v}" for k, v in names.items()}
        port = free_port()
        tuning = {} if external else {"CW_KAFKA__CONSUMER_CONFIG": json.dumps(DevBroker.CLIENT_TUNING)}
        env = {
            **tuning,
            "CW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "CW_KAFKA__GROUP_ID": f"classify-worker-demo-{tag}",
            "CW_KAFKA__INSTANCE_ID": f"demo-{tag}",
            "CW_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "CW_METRICS__PORT": str(port),
            **{f"CW_TOPICS__{k.upper()}": v for k, v in names.items()},
        }
        os.environ.update({k: v for k, v in env.items() if k not in os.environ or k == "CW_METRICS__PORT"})
        settings = load_settings()
        bundle = load_bundle(settings.model.path)
        router = Router(bundle.routes, bundle.labels, settings)
        ensure_for(settings, router)
        outputs = [*router.topics(), settings.topics.dlq]
        console.print(f"[bold]model[/] {bundle.model_id}: {len(bundle.labels)} labels → {len(outputs)} output topics")
        log = workdir / "worker.log"
        proc = stack.enter_context(running_worker(env, log))
        _wait_ready(port, proc, log)
        console.print(f"[bold]worker[/] ready (pid {proc.pid}, metrics on :{port})")

        traffic = messages()
        steady, steady_sent = _phase(
            console, "steady traffic", bootstrap, outputs, settings.topics.input, traffic, STEADY_RATE_PER_S
        )
        backlog_msgs = [
            DemoMessage(f"{m.key.decode()}-r{r}".encode(), m.value, m.expected)
            for r in range(BACKLOG_ROUNDS)
            for m in traffic
        ]
        started = time.time()
        backlog, _ = _phase(console, "backlog", bootstrap, outputs, settings.topics.input, backlog_msgs, None)
        drained = max((o.seen_at for o in backlog), default=started) - started
        return _summary(
            console,
            settings.topics.dlq,
            settings.topics.fallback,
            traffic,
            steady,
            steady_sent,
            backlog,
            len(backlog_msgs),
            drained,
        )


def _summary(
    console: Console,
    dlq: str,
    fallback: str,
    traffic: list[DemoMessage],
    steady: list[Output],
    sent: dict[bytes, float],
    backlog: list[Output],
    backlog_n: int,
    drained_s: float,
) -> int:
    expected = {m.key: m.expected for m in traffic}
    by_topic = Counter(o.topic for o in steady)
    topics = Table(title="where the steady traffic went")
    topics.add_column("topic")
    topics.add_column("messages", justify="right")
    for topic, n in sorted(by_topic.items()):
        topics.add_row(topic, str(n))
    console.print(topics)

    examples = Table(title="routed examples")
    for col in ("text", "category", "label", "cat/label score"):
        examples.add_column(col, justify="right" if col.endswith("score") else "left")
    shown: set[str] = set()
    for o in steady:
        if o.topic != dlq and o.value and len(shown) < 8:
            body = json.loads(o.value)
            route = body["route"]
            key = "fallback" if route["fallback"] else route["category"]
            if key not in shown:
                shown.add(key)
                examples.add_row(
                    body["text"],
                    "fallback" if route["fallback"] else route["category"],
                    route["label"],
                    f"{route['category_score']:.3f}/{route['score']:.3f}",
                )
    console.print(examples)

    reasons = Counter((o.headers.get("error.reason") or b"?").decode() for o in steady if o.topic == dlq)
    console.print("dead-letter reasons: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))

    agree = valid = 0
    for o in steady:
        exp = expected.get(o.key or b"", "")
        if o.topic == dlq or exp.startswith("dlq:"):
            continue
        valid += 1
        route = json.loads(o.value or b"{}")["route"]
        agree += ("fallback" if route["fallback"] else route["category"]) == exp
    latencies = np.array([o.seen_at - sent[o.key] for o in steady if o.key in sent]) * 1000
    keys = Counter(o.key for o in steady)
    lost = len(expected) - len(keys)
    dups = sum(n - 1 for n in keys.values() if n > 1)
    backlog_keys = Counter(o.key for o in backlog)
    figures = Table(title="figures")
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_row("steady messages (lost / duplicated)", f"{len(traffic)} ({lost} / {dups})")
    figures.add_row("routed as the demo expects", f"{agree / max(valid, 1):.1%} of {valid}")
    if len(latencies):
        figures.add_row(
            f"end-to-end latency p50 / p99 at {STEADY_RATE_PER_S} msg/s",
            f"{np.percentile(latencies, 50):.0f} ms / {np.percentile(latencies, 99):.0f} ms",
        )
    figures.add_row(
        "backlog messages (lost / duplicated)",
        f"{backlog_n} ({backlog_n - len(backlog_keys)} / {sum(n - 1 for n in backlog_keys.values())})",
    )
    figures.add_row(
        "backlog throughput, produce → last output visible", f"{backlog_n / max(drained_s, 1e-9):.0f} items/s"
    )
    console.print(figures)
    ok = lost == 0 and dups == 0 and len(backlog_keys) == backlog_n == len(backlog)
    console.print(
        "[bold green]every message routed exactly once[/]" if ok else "[bold red]messages lost or duplicated[/]"
    )
    return 0 if ok else 1
