"""Fixtures: a tiny model bundle built here, and a real broker — KAFKA_BOOTSTRAP_SERVERS if set,
else testcontainers' Kafka when a Docker daemon answers, else the embedded Tansu broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_model import build_bundle

CLINC = Path(os.environ.get("CLINC150_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def _broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int | None]]:
    """(bootstrap, pid of the broker process when it is ours to freeze, else None)."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if explicit:
        yield explicit, None
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server(), None
        return
    from worker.devbroker import DevBroker

    with DevBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log") as broker:
        yield broker.bootstrap, broker.pid


@pytest.fixture(scope="session")
def kafka_bootstrap(_broker: tuple[str, int | None]) -> str:
    return _broker[0]


@pytest.fixture(scope="session")
def broker_pid(_broker: tuple[str, int | None]) -> int | None:
    return _broker[1]
