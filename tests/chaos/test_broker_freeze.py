"""Issue 25, acceptance: the broker frozen 40 s under steady traffic (past the 30 s call timeout,
inside the 60 s transaction timeout), with an orchestrator that restarts workers that exit or
report unhealthy. Every message is routed exactly once within 2 minutes of the resume, and no
worker reports healthy while it makes no progress for longer than its stuck threshold.

Judged from outside the workers: a read_committed reader over every output (ids exactly once;
each worker's progress is when its committed outputs, named by their `route.batch` header,
appear), and `/healthz` probed as a kubelet would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devkit.ports import free_port
from devkit.toolkit import Output, produce, read_outputs, start_worker, stop_worker
from tests.chaos.fleet import freeze_broker
from tests.support import scenario
from tests.support.kafka import Broker, TopicSet, create_topic
from worker.engines.confluent import PROGRESS_STUCK_S

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.extended]  # 2-3 min: `make chaos`

PARTITIONS = 6
MESSAGES = 6_000
RATE_PER_S = 60.0  # 100 s of traffic: before, during and after the freeze
FREEZE_AT_S = 25.0
FREEZE_S = 40.0
RECOVERY_S = 120.0
CATEGORIES = ["banking", "travel", "weather"]
#: A kubelet's liveness probe: every 2 s, restart after 3 failures in a row.
PROBE_S = 2.0
FAILURES_TO_RESTART = 3
#: Probe and reader latency allowed when judging a healthy answer against the last progress.
SLACK_S = 5.0


@dataclass
class Fleet:
    """Workers w1, w2 and their orchestrator: restarts on exit, or on a failing liveness probe."""

    bootstrap: str
    bundle: Path
    tmp: Path
    topics: TopicSet = field(default_factory=TopicSet.fresh)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    #: When each process of an instance started (a restart keeps the instance id).
    starts: dict[str, list[float]] = field(default_factory=dict)
    #: (time, instance, healthy) for every probe answered while the process was the same one.
    probes: list[tuple[float, str, bool]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    running: bool = True
    _t0: float = field(default_factory=time.monotonic)

    def note(self, event: str) -> None:
        self.events.append(f"{time.monotonic() - self._t0:.0f}s {event}")

    def spawn(self, instance: str) -> None:
        port = free_port()
        env = {
            **self.topics.env(self.bootstrap),
            "CW_MODEL__PATH": str(self.bundle),
            "CW_KAFKA__INSTANCE_ID": instance,
            "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
            "CW_TOPICS__PARTITIONS": str(PARTITIONS),
            "CW_METRICS__PORT": str(port),
            "CW_METRICS__HOST": "127.0.0.1",
        }
        self.procs[instance] = start_worker(env, self.tmp / f"{instance}.log")
        self.ports[instance] = port
        self.starts.setdefault(instance, []).append(time.monotonic())

    def healthy(self, instance: str) -> bool | None:
        """/healthz; None while the process is not serving yet (starting, loading the model)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[instance]}/healthz", timeout=1.5) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as e:
            return e.code == 200
        except OSError:
            return None

    def orchestrate(self) -> None:
        failures = dict.fromkeys(self.procs, 0)
        while self.running:
            for instance, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    self.note(f"{instance} exited rc={proc.returncode}, restarted")
                    self.spawn(instance)
                    failures[instance] = 0
                    continue
                ok = self.healthy(instance)
                if ok is None:
                    continue
                self.probes.append((time.monotonic(), instance, ok))
                failures[instance] = 0 if ok else failures[instance] + 1
                if failures[instance] >= FAILURES_TO_RESTART:
                    self.note(f"{instance} unhealthy x{FAILURES_TO_RESTART}, killed and restarted")
                    proc.kill()
                    proc.wait(10)
                    self.spawn(instance)
                    failures[instance] = 0
            time.sleep(PROBE_S)

    def stop(self) -> None:
        self.running = False
        for proc in self.procs.values():
            stop_worker(proc, timeout_s=20)


@pytest.mark.timeout(600)
def test_a_40_s_broker_freeze_under_traffic_routes_everything_once_and_never_hides_a_stall(
    broker: Broker, tiny_bundle: Path, tmp_path: Path
) -> None:
    if broker.kafka is None or broker.kafka.pid is None:
        pytest.skip("needs the local Apache Kafka process to freeze")
    kafka_pid = broker.kafka.pid
    fleet = Fleet(broker.bootstrap, tiny_bundle, tmp_path)
    create_topic(broker.bootstrap, fleet.topics.input, PARTITIONS)
    outputs = fleet.topics.outputs(CATEGORIES)
    messages, expected = scenario.build(MESSAGES, malformed_every=50)

    # A read_committed reader from the first output on: when each worker's outputs become visible
    progress: dict[str, list[float]] = {"w1": [], "w2": []}
    received: list[Output] = []

    def on_output(o: Output) -> None:
        batch = (o.headers.get("route.batch") or b"").decode()
        progress.setdefault(batch.split(":", 1)[0], []).append(time.monotonic())

    def read() -> None:
        received.extend(
            read_outputs(broker.bootstrap, outputs, expect=MESSAGES, timeout_s=400, quiet_s=3, on_message=on_output)
        )

    producer = threading.Thread(
        target=lambda: produce(broker.bootstrap, fleet.topics.input, messages, rate_per_s=RATE_PER_S)
    )
    fleet.spawn("w1")
    fleet.spawn("w2")
    orchestrator = threading.Thread(target=fleet.orchestrate, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    resumed_at = 0.0
    try:
        # Given two workers under steady traffic
        orchestrator.start()
        deadline = time.monotonic() + 90
        while set(outputs) - set(_topics(broker.bootstrap)):
            assert time.monotonic() < deadline, f"workers did not create their topics; {fleet.events}"
            time.sleep(0.5)
        reader.start()
        producer.start()
        time.sleep(FREEZE_AT_S)
        # When the broker is frozen for 40 s, then resumed
        freeze_broker(kafka_pid, FREEZE_S, fleet.note)
        resumed_at = time.monotonic()
        producer.join(300)
        reader.join(RECOVERY_S + 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kafka_pid, signal.SIGCONT)
        fleet.stop()

    # Then every id is on its topic exactly once ...
    print(f"\nevents {fleet.events}; received {len(received)}")
    scenario.check(received, expected, fleet.topics.prefix, fleet.topics.dlq)
    # ... within 2 minutes of the resume
    last = max(t for times in progress.values() for t in times)
    assert last - resumed_at < RECOVERY_S, f"last output {last - resumed_at:.0f} s after the resume; {fleet.events}"
    # And no worker answered healthy after more than its stuck threshold without progress, while
    # there was work (traffic is steady until the last output)
    lies = []
    for t, instance, ok in fleet.probes:
        if not ok or t > last:  # after the last output there is no work left to progress on
            continue
        # the last visible output of this instance, or the start of the process that answered
        since = max(p for p in [*progress.get(instance, []), *fleet.starts[instance]] if p <= t)
        if t - since > PROGRESS_STUCK_S + SLACK_S:
            lies.append(f"{instance} healthy at {t - fleet._t0:.0f}s, {t - since:.0f} s without progress")
    assert not lies, f"{lies[:5]}; events {fleet.events}"


def _topics(bootstrap: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    return list(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)
