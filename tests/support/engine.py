"""The confluent engine in-process on a real broker, for tests that inject faults where a
subprocess cannot reach (a failing classifier, a blocked one) or watch the engine's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from tests.support import scenario
from tests.support.kafka import TopicSet
from worker.config import load_settings
from worker.engines.confluent import ConfluentEngine
from worker.observability import PrometheusHooks
from worker.pipeline import build_pipeline


def in_process_engine(
    bootstrap: str, topics: TopicSet, bundle: Path, instance: str | None = None, **sections: dict[str, Any]
) -> tuple[ConfluentEngine, PrometheusHooks]:
    """An engine on `topics` (3 partitions) with its own metrics registry; `sections` override
    settings sections, e.g. `commit={"interval_ms": 60_000}`."""
    settings = load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": topics.group,
            "instance_id": instance or topics.group,
            "session_timeout_ms": 6000,
            "consumer_config": {"fetch.wait.max.ms": 10},
        },
        topics={
            "input": topics.input,
            "prefix": topics.prefix,
            "fallback": topics.fallback,
            "dlq": topics.dlq,
            "partitions": 3,
        },
        model={"path": bundle},
        limits={"max_input_bytes": scenario.MAX_INPUT_BYTES},
        **sections,
    )
    hooks = PrometheusHooks(CollectorRegistry())
    return ConfluentEngine(settings, build_pipeline(settings), hooks), hooks
