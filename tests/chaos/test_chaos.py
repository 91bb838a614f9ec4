"""Kafka's own exactly-once system-test recipe, on Apache Kafka: seed unique ids, kill the
processors mid-transaction, rebalance, freeze a worker into a zombie, freeze and crash the broker,
then read every output back with read_committed and compare sets.

20,000 inbound messages (~2% malformed) over 6 partitions arrive at a steady rate while two
workers share the group. During the run: `kill -9` a worker three times and restart it, start a
third worker (a rebalance), SIGSTOP a worker past its session timeout while its transaction is
open and SIGCONT it (a zombie: its late offset commit must be fenced, KIP-447), SIGSTOP the broker
for 15 s, and `kill -9` the broker and restart it on the same data directory. A worker that exits
on its own is restarted, as an orchestrator would. `make chaos` runs a longer version
(CHAOS_MESSAGES).

The verdict comes from outside the workers only: a read_committed reader over every output
topic (each id exactly once, or at least once), the group's committed offsets against the input's
end offsets, and every output partition's last stable offset against its high watermark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from devkit.apache_kafka import LocalKafka
from devkit.toolkit import Output, Sent, produce, read_outputs, start_worker, stop_worker
from tests.chaos.fleet import freeze_broker, open_transactions
from tests.support import scenario
from tests.support.kafka import Broker, TopicSet, create_topic

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

PARTITIONS = 6
MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "20000"))
#: Spread over ~60 s so most faults (the zombie and the broker's freeze take 13-16 s each) land
#: in live traffic, well under one worker's capacity.
RATE_PER_S = MESSAGES / 60
FREEZE_S = 15.0
#: The workers' session timeout is 6 s (TopicSet.env): a zombie frozen this long has lost its
#: partitions to the others before it wakes up.
ZOMBIE_S = 12.0
CATEGORIES = ["banking", "travel", "weather"]


@dataclass
class Run:
    bootstrap: str
    bundle: Path
    tmp: Path
    delivery: str
    topics: TopicSet = field(default_factory=TopicSet.fresh)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _supervising: bool = True
    _t0: float = field(default_factory=time.monotonic)

    def note(self, event: str) -> None:
        """An event, stamped with seconds since the run began, for the failure message."""
        self.events.append(f"{time.monotonic() - self._t0:.0f}s {event}")

    def env(self, instance: str) -> dict[str, str]:
        return {
            **self.topics.env(self.bootstrap),
            "CW_MODEL__PATH": str(self.bundle),
            "CW_KAFKA__INSTANCE_ID": instance,
            "CW_DELIVERY": self.delivery,
            "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
            "CW_TOPICS__PARTITIONS": str(PARTITIONS),
            "CW_METRICS__PORT": "0",
            "CW_BATCH__MAX_ITEMS": "64",
        }

    def start(self, instance: str) -> None:
        with self._lock:
            self._spawn(instance)

    def _spawn(self, instance: str) -> None:
        self.workers[instance] = start_worker(self.env(instance), self.tmp / f"{instance}.log")

    def kill9(self, instance: str) -> None:
        with self._lock:  # kill and restart as one step, so the supervisor never restarts it too
            self.workers[instance].send_signal(signal.SIGKILL)
            self.workers[instance].wait(10)
            self._spawn(instance)  # same instance id: the new process fences the old transaction
        self.note(f"kill -9 {instance} at {self.progress():.0%}")

    def supervise(self) -> None:
        """Restart a worker that exited on its own (e.g. fenced, or fatal after a broker crash),
        as a Kubernetes restartPolicy would; the test's own kills restart in `kill9`."""
        while self._supervising:
            with self._lock:
                for instance, w in list(self.workers.items()):
                    if self._supervising and w.poll() is not None:
                        self.note(f"{instance} exited rc={w.returncode}, restarted")
                        self._spawn(instance)
            time.sleep(0.5)

    def committed(self) -> dict[int, int]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.topics.group})
        try:
            tps = c.committed([TopicPartition(self.topics.input, p) for p in range(PARTITIONS)], timeout=10)
            return {tp.partition: max(tp.offset, 0) for tp in tps}
        finally:
            c.close()

    def progress(self) -> float:
        try:
            return sum(self.committed().values()) / MESSAGES
        except Exception:  # broker frozen or down: progress unknown, keep waiting
            return 0.0

    def wait_progress(self, fraction: float, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.progress() < fraction:
            assert time.monotonic() < deadline, f"stuck below {fraction:.0%}; events: {self.events}"
            time.sleep(0.2)

    def make_zombie(self, instance: str, outputs: list[str]) -> None:
        """Freeze `instance` past its session timeout, then wake it; in exactly_once, while it
        holds an open transaction. An output partition whose last stable offset stays behind its
        high watermark for a second after the freeze can only be held by the frozen worker's
        transaction (the others commit every few milliseconds): that is how the test knows a
        batch is in hand."""
        proc = self.workers[instance]
        for attempt in range(1, 31 if self.delivery == "exactly_once" else 1):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            if open_transactions(self.bootstrap, outputs):
                self.note(f"zombie {instance} frozen with an open transaction (try {attempt})")
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        else:
            self.note(f"zombie {instance} frozen")
            proc.send_signal(signal.SIGSTOP)
        time.sleep(ZOMBIE_S)
        proc.send_signal(signal.SIGCONT)
        self.note(f"zombie {instance} resumed at {self.progress():.0%}")

    def stop_all(self) -> None:
        self._supervising = False
        with self._lock:
            for w in self.workers.values():
                stop_worker(w, timeout_s=20)


def _crash_broker(kafka: LocalKafka, run: Run) -> None:
    kafka.kill()
    run.note("broker kill -9")
    time.sleep(2.0)
    kafka.start()
    run.note("broker restarted on its data dir")


@pytest.mark.timeout(900)  # a loaded 2-core machine: ~3 min each when idle, much longer when not
@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_crashes_rebalances_zombies_and_broker_faults_lose_nothing(
    broker: Broker, tiny_bundle: Path, tmp_path: Path, delivery: str
) -> None:
    if broker.kind == "tansu":
        pytest.skip("the embedded Tansu broker shows aborted records and does not fence zombies: no proof possible")
    kafka = broker.kafka
    run = Run(broker.bootstrap, tiny_bundle, tmp_path, delivery)
    create_topic(broker.bootstrap, run.topics.input, PARTITIONS)
    outputs = run.topics.outputs(CATEGORIES)
    messages, expected = scenario.build(MESSAGES, malformed_every=50)
    sent: list[Sent] = []
    producer = threading.Thread(
        target=lambda: sent.append(produce(broker.bootstrap, run.topics.input, messages, rate_per_s=RATE_PER_S))
    )
    supervisor = threading.Thread(target=run.supervise, daemon=True)
    try:
        # Given two workers in one group and a steady stream
        run.start("w1")
        run.start("w2")
        supervisor.start()
        producer.start()
        # When workers are killed, a third joins, one turns zombie, and the broker freezes and crashes
        run.wait_progress(0.10)
        run.kill9("w1")
        run.wait_progress(0.20)
        run.kill9("w2")
        run.wait_progress(0.28)
        run.start("w3")
        run.note(f"start w3 at {run.progress():.0%}")
        run.wait_progress(0.34)
        run.kill9("w1")
        run.wait_progress(0.40)
        run.make_zombie("w2", outputs)
        if kafka is not None and kafka.pid is not None:
            run.wait_progress(0.64)
            freeze_broker(kafka.pid, FREEZE_S, run.note)
            run.wait_progress(0.86)
            _crash_broker(kafka, run)
        producer.join(240)
        run.wait_progress(1.0, timeout_s=240)
    finally:
        if kafka is not None and kafka.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kafka.pid, signal.SIGCONT)
        run.stop_all()

    # Then every id is routed or dead-lettered: exactly once, or at least once
    received = read_outputs(broker.bootstrap, outputs, expect=MESSAGES, timeout_s=120)
    counts = Counter(r.key for r in received)
    dups = sum(n - 1 for n in counts.values() if n > 1)
    print(f"\n{delivery}: {MESSAGES} messages, events {run.events}, received {len(received)}, duplicated {dups}")
    if dups:  # which worker process wrote the copies of re-delivered ids (instance:nonce of `route.batch`)
        writers = Counter(_writer(r) for r in received if counts[r.key] > 1)
        print(f"copies of re-delivered ids by writer process: {dict(writers.most_common())}; logs in {tmp_path}")
    scenario.check(received, expected, run.topics.prefix, run.topics.dlq, exactly_once=delivery == "exactly_once")
    assert sent, "the input producer failed: see the thread's exception above"
    assert run.committed() == sent[0].ends, "group's committed offsets must equal the input end offsets"
    assert open_transactions(broker.bootstrap, outputs) == [], "an output partition still has an open transaction"


def _writer(output: Output) -> str:
    """The worker process that wrote an output: `instance:nonce` of its `route.batch` unit id."""
    unit = (output.headers.get("route.batch") or b"").decode()
    return unit.rsplit(":", 1)[0]
