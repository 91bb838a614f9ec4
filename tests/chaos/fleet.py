"""Shared by the fault-proxy, cluster and soak tests: a fleet of worker subprocesses under an
orchestrator that restarts any that exits, a paced input stream, and the verdict from outside
(a read_committed reader, the group's committed offsets, last stable offsets)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from devkit.toolkit import Outbound, Sent, produce, read_outputs, start_worker, stop_worker
from tests.support import scenario
from tests.support.kafka import TopicSet

CATEGORIES = ["banking", "travel", "weather"]


class WorkerCrashedError(Exception):
    """A worker died of a signal the test did not send (e.g. SIGSEGV): exactly-once may still
    hold, since its restart fences the transaction, but a worker must not crash on a fault."""


@dataclass
class Fleet:
    """Workers `w1`, `w2`, … of one group; `bootstrap` is what workers use (maybe a proxy),
    `direct` what the test's own clients use."""

    bootstrap: str
    direct: str
    bundle: Path | None  # None: the model shipped in the package
    tmp: Path
    partitions: int
    replication: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    #: after `classify-worker run`, e.g. ("--engine", "faust")
    args: tuple[str, ...] = ()
    topics: TopicSet = field(default_factory=TopicSet.fresh)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    exits: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _supervising: bool = False
    _t0: float = field(default_factory=time.monotonic)

    def note(self, event: str) -> None:
        self.events.append(f"{time.monotonic() - self._t0:.0f}s {event}")

    def env(self, instance: str) -> dict[str, str]:
        return {
            **self.topics.env(self.bootstrap),
            **({"CW_MODEL__PATH": str(self.bundle)} if self.bundle else {}),
            "CW_KAFKA__INSTANCE_ID": instance,
            "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
            "CW_TOPICS__PARTITIONS": str(self.partitions),
            "CW_TOPICS__REPLICATION": str(self.replication),
            "CW_METRICS__PORT": "0",
            "CW_BATCH__MAX_ITEMS": "64",
            # a worker killed by a signal it did not get from us (SIGSEGV) leaves its stack in its log
            "PYTHONFAULTHANDLER": "1",
            **self.extra_env,
        }

    @property
    def outputs(self) -> list[str]:
        return self.topics.outputs(CATEGORIES)

    def create_input(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.direct})
        for f in admin.create_topics([NewTopic(self.topics.input, self.partitions, self.replication)]).values():
            f.result(30)

    def start(self, *instances: str) -> None:
        with self._lock:
            for instance in instances:
                self.workers[instance] = self._spawn(instance)
        if not self._supervising:
            self._supervising = True
            threading.Thread(target=self._supervise, daemon=True).start()

    def _spawn(self, instance: str) -> subprocess.Popen[bytes]:
        return start_worker(self.env(instance), self.tmp / f"{instance}.log", *self.args)

    def kill9(self, instance: str) -> None:
        """`kill -9` and restart under the same instance id (its restart fences the transaction)."""
        with self._lock:
            self.workers[instance].send_signal(signal.SIGKILL)
            self.workers[instance].wait(10)
            self.workers[instance] = self._spawn(instance)
        self.note(f"kill -9 {instance}")

    def _supervise(self) -> None:
        """Restart a worker that exited on its own, as a Kubernetes restartPolicy would."""
        while self._supervising:
            with self._lock:
                for instance, w in list(self.workers.items()):
                    if self._supervising and w.poll() is not None:
                        self.exits[w.returncode] += 1
                        self.note(f"{instance} exited rc={w.returncode}, restarted")
                        self.workers[instance] = self._spawn(instance)
            time.sleep(0.5)

    def assert_no_crash(self) -> None:
        """Exit 1 (a wedged client, on purpose) is allowed; death by a signal is not."""
        crashes = {rc: n for rc, n in self.exits.items() if rc < 0}
        if crashes:
            logs = sorted(self.tmp.glob("w*.log"))
            raise WorkerCrashedError(f"workers died of signals {crashes} (rc: count); see {logs}; events {self.events}")

    def stop_all(self) -> None:
        self._supervising = False
        with self._lock:
            for w in self.workers.values():
                stop_worker(w, timeout_s=20)

    def committed(self) -> dict[int, int]:
        c = Consumer({"bootstrap.servers": self.direct, "group.id": self.topics.group})
        try:
            tps = [TopicPartition(self.topics.input, p) for p in range(self.partitions)]
            return {tp.partition: max(tp.offset, 0) for tp in c.committed(tps, timeout=10)}
        finally:
            c.close()

    def progress(self, total: int) -> float:
        try:
            return sum(self.committed().values()) / total
        except Exception:  # broker or coordinator away: progress unknown, keep waiting
            return 0.0

    def wait_progress(self, fraction: float, total: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.progress(total) < fraction:
            assert time.monotonic() < deadline, f"stuck below {fraction:.0%} of {total}; events: {self.events}"
            time.sleep(0.3)
        self.note(f"{fraction:.0%} committed")


class Feed:
    """The input stream on its own thread, sent straight to the broker (never through a fault)."""

    def __init__(self, bootstrap: str, topic: str, messages: list[Outbound], rate_per_s: float) -> None:
        self.sent: list[Sent] = []
        self._thread = threading.Thread(
            target=lambda: self.sent.append(produce(bootstrap, topic, messages, rate_per_s=rate_per_s)), daemon=True
        )

    def start(self) -> Feed:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> Sent:
        self._thread.join(timeout_s)
        assert self.sent, "the input producer failed or is still running: see the thread's exception above"
        return self.sent[0]


def open_transactions(bootstrap: str, topics: list[str]) -> list[str]:
    """Output partitions whose last stable offset is behind the high watermark (watermarks read
    first: records appended between the two reads can only raise the stable offset)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=10).topics
    tps = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]

    def latest(isolation: IsolationLevel) -> dict[TopicPartition, int]:
        futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, isolation_level=isolation)
        return {tp: f.result(30).offset for tp, f in futures.items()}

    high = latest(IsolationLevel.READ_UNCOMMITTED)
    stable = latest(IsolationLevel.READ_COMMITTED)
    return [f"{tp.topic}[{tp.partition}] LSO {stable[tp]} < HW {high[tp]}" for tp in tps if stable[tp] < high[tp]]


def freeze_broker(pid: int, seconds: float, note: Callable[[str], None]) -> None:
    """SIGSTOP the broker for `seconds`, then SIGCONT it (whatever happens meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    note("broker SIGSTOP")
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    note("broker SIGCONT")


def wait_until(check: Callable[[], list[str]], timeout_s: float) -> list[str]:
    """Poll `check` until it returns no problems or `timeout_s` passes; the last problems."""
    deadline = time.monotonic() + timeout_s
    while (problems := check()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return problems


def verdict(fleet: Fleet, expected: dict[str, scenario.Expected], sent: Sent) -> tuple[int, int]:
    """Exactly-once from outside the workers: each id once on its topic (read_committed), the
    group's offsets at the input's end offsets, no open transaction. Returns (received, duplicated)."""
    received = read_outputs(fleet.direct, fleet.outputs, expect=len(expected), timeout_s=120)
    counts = Counter(r.key for r in received)
    dups = sum(n - 1 for n in counts.values() if n > 1)
    print(f"\nreceived {len(received)} of {len(expected)}, duplicated {dups}; events {fleet.events}")
    scenario.check(received, expected, fleet.topics.prefix, fleet.topics.dlq, exactly_once=True)
    assert fleet.committed() == sent.ends, "group's committed offsets must equal the input end offsets"
    # a killed broker's transactions are rolled back by the new coordinator a moment later
    assert wait_until(lambda: open_transactions(fleet.direct, fleet.outputs), 60) == [], "an open transaction"
    fleet.assert_no_crash()
    return len(received), dups
