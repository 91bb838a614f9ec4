"""Create the topics a deployment needs, idempotently: input, one per category, fallback, DLQ,
and the shadow topic when a shadow model is set."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from worker.config import Settings
from worker.errors import DeliveryError
from worker.kafka_util import kafka_error
from worker.routing import Router

log = logging.getLogger(__name__)

#: Admin requests wait this long for the controller; creation on a healthy cluster takes < 1 s.
ADMIN_TIMEOUT_S = 30.0


def required_topics(settings: Settings, router: Router) -> list[str]:
    shadow = [settings.shadow.topic] if settings.shadow.model_path is not None else []
    return sorted({settings.topics.input, settings.topics.dlq, *router.topics(), *shadow})


#: A topic the cluster does not know, or will not describe to us (no DESCRIBE ACL: creating it
#: is then refused with a line that names the ACL).
_ABSENT = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED})


def missing_topics(admin: AdminClient, names: Iterable[str]) -> list[str]:
    """Our topics the cluster lacks, asking about these topics only: the check runs every
    `TOPIC_CHECK_INTERVAL_S` on every replica, and cluster-wide metadata (`list_topics()`) on a
    cluster with thousands of topics is megabytes per request."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    futures = admin.describe_topics(TopicCollection(wanted), request_timeout=ADMIN_TIMEOUT_S)
    missing = []
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as e:
            if kafka_error(e).code() not in _ABSENT:
                raise
            missing.append(name)
    return sorted(missing)


def ensure_topics(admin: AdminClient, names: Iterable[str], partitions: int, replication: int) -> list[str]:
    """Create the missing topics; return the names created. Existing topics are left alone."""
    missing = missing_topics(admin, names)
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=replication) for n in missing],
        request_timeout=ADMIN_TIMEOUT_S,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a racing replica made it first
                raise DeliveryError(f"cannot create topic {name}: {e.args[0].str()}") from e
    if created:
        log.info("topics created", extra={"topics": created, "partitions": partitions})
    return sorted(created)


def smallest_message_limit(admin: AdminClient, names: Iterable[str]) -> int | None:
    """The smallest `max.message.bytes` among these topics; None when none could be read (the
    producer's own limit then stands, and a refusal is dead-lettered after one rewind)."""
    resources = [ConfigResource(ResourceType.TOPIC, n) for n in sorted(set(names))]
    limits = []
    for future in admin.describe_configs(resources, request_timeout=ADMIN_TIMEOUT_S).values():
        try:
            entry = future.result().get("max.message.bytes")
        except KafkaException as e:
            log.debug("topic config not available", extra={"error": str(e)})
            continue
        if entry is not None and entry.value:
            limits.append(int(entry.value))
    return min(limits) if limits else None


def admin_client(settings: Settings) -> AdminClient:
    conf: dict[str, Any] = {**settings.librdkafka_admin(), "logger": logging.getLogger("librdkafka")}
    return AdminClient(conf)


def ensure_for(settings: Settings, router: Router) -> list[str]:
    return ensure_topics(
        admin_client(settings),
        required_topics(settings, router),
        settings.topics.partitions,
        settings.topics.replication,
    )
