"""Broker helpers for integration tests: unique names, producing, worker subprocesses.

Reading outputs back uses `devkit.toolkit.read_outputs`, the same read_committed reader the demo uses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


@dataclass(frozen=True)
class TopicSet:
    """Per-test topic and group names, so tests never see each other's data."""

    input: str
    prefix: str
    fallback: str
    dlq: str
    group: str

    @classmethod
    def fresh(cls) -> TopicSet:
        tag = uuid.uuid4().hex[:10]
        return cls(f"in-{tag}", f"routed-{tag}.", f"routed-{tag}.fallback", f"dlq-{tag}", f"group-{tag}")

    def env(self, bootstrap: str) -> dict[str, str]:
        return {
            "CW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "CW_KAFKA__GROUP_ID": self.group,
            "CW_TOPICS__INPUT": self.input,
            "CW_TOPICS__PREFIX": self.prefix,
            "CW_TOPICS__FALLBACK": self.fallback,
            "CW_TOPICS__DLQ": self.dlq,
            "CW_KAFKA__SESSION_TIMEOUT_MS": "6000",
        }

    def outputs(self, categories: Iterable[str]) -> list[str]:
        return [self.prefix + c for c in categories] + [self.fallback, self.dlq]


def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> int:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    n = 0
    for key, value, headers in messages:
        p.produce(topic, value=value, key=key, headers=headers)
        n += 1
        if n % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0, "producer did not deliver every test message"
    return n


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the futures
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(30)


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`classify-worker <args>` as a subprocess, run to completion; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_cli(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`classify-worker <args>` as a background subprocess (so tests can kill -9 it)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )


def start_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`classify-worker run` as a real subprocess (so tests can kill -9 it)."""
    return start_cli(env, log_path, "run", *args)


def wait_for_log(log_path: Path, needle: str, timeout_s: float = 60.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists() and log_path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"{needle!r} not seen {count}x in {log_path} within {timeout_s}s:\n{tail}")
