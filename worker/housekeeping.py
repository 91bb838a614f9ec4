"""Lag and topic checks on their own thread and admin client, for either engine: a slow
metadata or offsets request never delays a batch, and both engines report lag and recreate a
deleted output topic the same way. The same thread hands freed heap memory back to the OS now
and then (worker/memory.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from worker.config import Settings
from worker.errors import DeliveryError
from worker.memory import release_free_memory
from worker.observability import Hooks
from worker.routing import Router
from worker.topics import ADMIN_TIMEOUT_S, admin_client, ensure_topics, missing_topics, required_topics

log = logging.getLogger(__name__)

#: How often the output topics are checked for existence (a deleted one is recreated).
TOPIC_CHECK_INTERVAL_S = 10.0
#: How often lag is computed from watermarks and committed offsets.
LAG_INTERVAL_S = 5.0
#: How often freed heap memory is handed back to the OS: a trim costs a few milliseconds, and a
#: burst's freed memory is given back within a minute of it.
MEMORY_TRIM_INTERVAL_S = 60.0
#: Stop waits this long for the housekeeping thread: a shutdown must fit the pod's grace period.
HOUSEKEEPING_JOIN_S = 1.0


class Housekeeping:
    """Lag and topic checks on their own thread and admin client, so a slow metadata or
    offsets request never delays a batch. `check_topics_soon` asks for a check after a failed
    delivery: an output topic deleted under us is recreated (auto_create) or reported."""

    def __init__(
        self, settings: Settings, router: Router, hooks: Hooks, assigned: Callable[[], set[tuple[str, int]]]
    ) -> None:
        self._settings = settings
        self._router = router
        self._hooks = hooks
        self._assigned = assigned
        self.admin: AdminClient = admin_client(settings)
        #: Reads the group's committed offsets; made on first use, never subscribes (see `_committed`).
        self.offsets: Consumer | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._topics_now = False
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (run may fail before it starts)
            self._thread.join(HOUSEKEEPING_JOIN_S)  # a daemon: an admin call stuck on a down broker is abandoned
        if self.offsets is not None and not self._thread.is_alive():  # never close a client in use
            self.offsets.close()

    def check_topics_soon(self) -> None:
        self._topics_now = True
        self._wake.set()

    def _run(self) -> None:
        next_lag = 0.0
        next_topics = time.monotonic() + TOPIC_CHECK_INTERVAL_S
        next_trim = time.monotonic() + MEMORY_TRIM_INTERVAL_S
        while not self._stopped.is_set():
            now = time.monotonic()
            if self._topics_now or now >= next_topics:
                self._topics_now, next_topics = False, now + TOPIC_CHECK_INTERVAL_S
                self._safely(self.check_topics)
            if now >= next_lag:
                next_lag = now + LAG_INTERVAL_S
                self._safely(self.report_lag)
            if now >= next_trim:
                next_trim = now + MEMORY_TRIM_INTERVAL_S
                self._safely(release_free_memory)
            self._wake.wait(max(0.0, min(next_lag, next_topics, next_trim) - time.monotonic()))
            self._wake.clear()

    @staticmethod
    def _safely(check: Callable[[], object]) -> None:
        """An unexpected error is logged and the timer goes on: a dead housekeeping thread would
        silently freeze the lag gauge and stop recreating deleted topics."""
        try:
            check()
        except Exception:
            log.exception("housekeeping check failed", extra={"check": check.__name__})

    def check_topics(self) -> None:
        try:
            names = required_topics(self._settings, self._router)
            t = self._settings.topics
            if t.auto_create:
                created = ensure_topics(self.admin, names, t.partitions, t.replication)
                if created:
                    log.warning("recreated missing topics", extra={"topics": created})
            elif missing := missing_topics(self.admin, names):
                log.error("output topics missing; create them or set CW_TOPICS__AUTO_CREATE", extra={"topics": missing})
        except (KafkaException, DeliveryError) as e:
            log.warning("cannot check topics", extra={"error": str(e)})

    def _offsets(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        futures = self.admin.list_offsets({tp: spec for tp in tps}, request_timeout=ADMIN_TIMEOUT_S)
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    def _committed(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """The group's committed offsets, asked of its coordinator by a consumer of the group
        that never joins it. Not the admin client's `list_consumer_group_offsets`: librdkafka
        2.16 crashes the process (SIGSEGV in `rd_kafka_cgrp_op`, called with the admin client's
        NULL group handle from `rd_kafka_handle_OffsetFetch`) when that answer carries a
        coordinator error, as when a broker of the cluster restarts (core dump, docs/reliability.md)."""
        if self.offsets is None:
            self.offsets = Consumer(self._settings.librdkafka_consumer())
        found = self.offsets.committed(tps, timeout=ADMIN_TIMEOUT_S)
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    def report_lag(self) -> None:
        """High watermark minus the group's committed offset, both read from the broker."""
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned())]
        if not tps:
            return
        try:
            committed = self._committed(tps)
            highs = self._offsets(tps, OffsetSpec.latest())  # type: ignore[no-untyped-call]
            # nothing committed yet (-1001): the group starts from the log start, not from 0
            fresh = [tp for tp in tps if committed.get((tp.topic, tp.partition), -1) < 0]
            starts = self._offsets(fresh, OffsetSpec.earliest()) if fresh else {}  # type: ignore[no-untyped-call]
            for tp in tps:
                key = (tp.topic, tp.partition)
                done = committed[key] if committed.get(key, -1) >= 0 else starts[key]
                self._hooks.on_lag(tp.topic, tp.partition, max(0, highs[key] - done))
        except KafkaException as e:
            log.debug("lag not available", extra={"error": str(e)})
