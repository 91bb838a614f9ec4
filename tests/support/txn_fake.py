"""A fake transactional producer that answers as librdkafka's transaction manager does when the
broker stops answering mid-commit (rdkafka_txnmgr.c): a `commit_transaction` (or
`abort_transaction`) that times out fails with a *retriable* `_TIMED_OUT` and stays in progress;
until the same call is made again and completes, every other transactional call fails with
`_CONFLICT` "Conflicting commit_transaction API call is already in progress", which is neither
retriable nor abortable. Records are size-checked against `message.max.bytes` like librdkafka's
`produce` (key + value + headers, synchronously `MSG_SIZE_TOO_LARGE`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

#: librdkafka's default `message.max.bytes`.
MESSAGE_MAX_BYTES = 1_000_000


class TxnProducer:
    def __init__(self, frozen_commits: int = 0, frozen_aborts: int = 0, max_bytes: int = MESSAGE_MAX_BYTES) -> None:
        #: Commit (abort) attempts that block for their timeout and fail retriably: a frozen broker.
        self.frozen_commits = frozen_commits
        self.frozen_aborts = frozen_aborts
        self.max_bytes = max_bytes
        self.calls: list[str] = []
        self.in_progress: str | None = None
        self.open = False
        self.pending: list[tuple[str, bytes | None, bytes | None, list[Any]]] = []
        self.pending_offsets: list[tuple[str, int, int]] = []
        #: What committed transactions made visible to a read_committed reader.
        self.committed: list[tuple[str, bytes | None, bytes | None, list[Any]]] = []
        self.committed_offsets: list[tuple[str, int, int]] = []
        #: Commits that fail with an error requiring an abort (e.g. a lost coordinator epoch).
        self.abortable_commits = 0
        #: Delivery errors to report for the next records produced to these topics (a broker-side refusal).
        self.refuse_topics: dict[str, KafkaError] = {}
        #: The broker is slow to write a commit's markers (just after a freeze): the next
        #: transaction's partitions register only once its records are delivered (`flush`).
        self.slow_markers = False
        self._unregistered = False
        self._reports: list[tuple[Callable[..., None], KafkaError]] = []

    def _conflict(self, call: str) -> None:
        if self.in_progress is not None and self.in_progress != call:
            raise KafkaException(
                KafkaError(
                    KafkaError._CONFLICT, f"Conflicting {self.in_progress}_transaction API call is already in progress"
                )
            )

    def begin_transaction(self) -> None:
        self._conflict("begin")
        if self.open:
            raise KafkaException(KafkaError(KafkaError._STATE, "Operation not valid in state InTransaction"))
        self.calls.append("begin")
        self.open = True

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[Any] | None = None,
        on_delivery: Callable[..., None] | None = None,
    ) -> None:
        self._conflict("produce")
        if not self.open:
            raise KafkaException(KafkaError(KafkaError._STATE, "No transaction in progress"))
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers or [])
        if size > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"))
        self.calls.append("produce")
        self._unregistered = self._unregistered or self.slow_markers
        self.pending.append((topic, key, value, list(headers or [])))
        refusal = self.refuse_topics.get(topic)
        if refusal is not None and on_delivery is not None:
            self._reports.append((on_delivery, refusal))

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], _group: object, _timeout: float) -> None:
        self._conflict("send_offsets")
        self.pending_offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def commit_transaction(self, timeout: float) -> None:
        self._conflict("commit")
        self.calls.append("commit")
        if self.frozen_commits > 0:
            self.frozen_commits -= 1
            self.in_progress = "commit"
            time.sleep(timeout)
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "Failed to flush all outstanding messages", retriable=True)
            )
        self.poll(0)
        if self.abortable_commits > 0:
            self.abortable_commits -= 1
            raise KafkaException(KafkaError(KafkaError._FENCED, "epoch bumped", txn_requires_abort=True))
        if any(topic in self.refuse_topics for topic, *_ in self.pending):
            self.in_progress = None
            raise KafkaException(
                KafkaError(KafkaError._INCONSISTENT, "Failed to deliver messages", txn_requires_abort=True)
            )
        self.in_progress, self.open, self._unregistered = None, False, False  # it flushed first
        self.committed.extend(self.pending)
        self.committed_offsets.extend(self.pending_offsets)
        self.pending, self.pending_offsets = [], []

    def abort_transaction(self, timeout: float) -> None:
        self._conflict("abort")
        self.calls.append("abort")
        if self._unregistered:
            # librdkafka sends EndTxn(abort) while AddPartitionsToTxn is still being retried
            # (CONCURRENT_TRANSACTIONS); the coordinator, the last commit complete, refuses it
            raise KafkaException(
                KafkaError(KafkaError.INVALID_TXN_STATE, "Failed to end transaction: Broker: invalid state", fatal=True)
            )
        if self.frozen_aborts > 0:
            self.frozen_aborts -= 1
            self.in_progress = "abort"
            time.sleep(timeout)
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "Transactional API operation timed out", retriable=True)
            )
        self.in_progress, self.open = None, False
        self.pending, self.pending_offsets = [], []

    def poll(self, _timeout: float = 0) -> int:
        reports, self._reports = self._reports, []
        for cb, err in reports:
            cb(err, None)
        return len(reports)

    def flush(self, _timeout: float = 0) -> int:
        self.calls.append("flush")
        self._unregistered = False
        self.poll(0)
        return 0
