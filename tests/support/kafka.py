"""Broker helpers for integration tests: the session's broker, unique names, producing.

Worker subprocesses and reading outputs back use `devkit.toolkit`, as the demo and bench do."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from devkit import toolkit
from devkit.apache_kafka import LocalKafka
from devkit.toolkit import Outbound

#: The Faust engine's tests need the [faust] extra (in [dev]): skipped, with the reason, without it.
NEEDS_FAUST = pytest.mark.skipif(importlib.util.find_spec("faust") is None, reason="needs the [faust] extra")


@dataclass(frozen=True)
class Broker:
    """The test session's broker; `kafka` is set when it is our own Apache Kafka process, which
    the chaos test may freeze, kill -9 and restart on its data directory."""

    bootstrap: str
    kind: str  # external | testcontainers | apache-kafka | tansu
    kafka: LocalKafka | None = None


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


def produce(bootstrap: str, topic: str, messages: Iterable[Outbound]) -> int:
    """Every message, at once; returns how many were acknowledged."""
    return toolkit.produce(bootstrap, topic, messages).count


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the futures
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(30)


def run_cli(
    env: dict[str, str], *args: str, timeout_s: float = 120, module: str = "worker.cli"
) -> subprocess.CompletedProcess[str]:
    """`classify-worker <args>` (or `python -m devkit <args>`) run to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def wait_for_log(log_path: Path, needle: str, timeout_s: float = 60.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists() and log_path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"{needle!r} not seen {count}x in {log_path} within {timeout_s}s:\n{tail}")
