"""Replay's transactions against a fake producer that answers as librdkafka does: a commit that
timed out is resumed (never aborted into "Conflicting commit_transaction API call"), and a
record the producer refuses by size is skipped and counted, not retried forever."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from typer.testing import CliRunner

from tests.support.txn_fake import TxnProducer
from worker import cli
from worker.config import load_settings
from worker.errors import FatalDeliveryError, KafkaAccessError
from worker.replay import Replayer, Selection, Summary

DLQ = "dlq"


class FakeReader:
    """Hands out its messages once per position; `rewind` goes back (as after an abort)."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.position = {(DLQ, 0): 0}
        self.rewinds: list[dict[tuple[str, int], int]] = []

    def done(self) -> bool:
        return self.position[(DLQ, 0)] >= len(self.messages)

    def take(self, max_messages: int, _timeout_s: float) -> list[Message]:
        start = self.position[(DLQ, 0)]
        batch = self.messages[start : start + max_messages]
        self.position[(DLQ, 0)] = start + len(batch)
        return batch

    def rewind(self, offsets: dict[tuple[str, int], int]) -> None:
        self.rewinds.append(offsets)
        self.position.update(offsets)


def _dead(offset: int, value: bytes | None = b'{"text": "rain"}', **extra: bytes) -> Message:
    headers: list[Any] = [("error.reason", b"schema"), *extra.items()]
    return Message(topic=DLQ, partition=0, offset=offset, key=f"k{offset}".encode(), value=value, headers=headers)


def _replayer(monkeypatch: pytest.MonkeyPatch) -> Replayer:
    # every call times out after 0.2 s, as every call does after 30 s in production (the old
    # code's default retry window was the call timeout itself: one timed-out commit ended it)
    monkeypatch.setattr("worker.replay.CALL_TIMEOUT_S", 0.2)
    monkeypatch.setattr("worker.kafka_util.retry_call.__defaults__", (0.2, lambda: None))
    settings = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1", "transaction_timeout_ms": 1000})
    replayer = Replayer(settings, Selection(DLQ, "in"), group="g", batch_size=10)
    replayer.consumer.close()
    replayer.consumer = type("C", (), {"consumer_group_metadata": lambda self: object()})()  # type: ignore[assignment]
    return replayer


@pytest.mark.timeout(20)  # before the fix: abort, "Conflicting commit_transaction", rewind, forever
def test_replay_resumes_a_commit_that_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a broker that stops answering for two commit attempts
    replayer = _replayer(monkeypatch)
    producer = TxnProducer(frozen_commits=2)
    reader = FakeReader([_dead(0), _dead(1)])
    summary = Summary("g", dry_run=False)
    # When the replay runs
    replayer._replay(reader, producer, summary)  # type: ignore[arg-type]
    # Then the commit was resumed until it completed: both re-driven once, nothing aborted
    assert "abort" not in producer.calls and reader.rewinds == []
    assert [k for _t, k, _v, _h in producer.committed] == [b"k0", b"k1"]
    assert summary.replayed == {"schema": 2}


@pytest.mark.timeout(20)
def test_replay_ends_fatally_when_a_commit_cannot_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    replayer = _replayer(monkeypatch)
    producer = TxnProducer(frozen_commits=1000)
    with pytest.raises(FatalDeliveryError, match="not completed within"):
        replayer._replay(FakeReader([_dead(0)]), producer, Summary("g", dry_run=False))  # type: ignore[arg-type]
    assert "abort" not in producer.calls


def test_replay_skips_records_it_cannot_send_instead_of_retrying_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a dead letter larger than the producer's limit, and one kept without its body
    replayer = _replayer(monkeypatch)
    producer = TxnProducer(max_bytes=100)
    body_less = _dead(1, None, **{"error.value_sha256": b"ab" * 32, "error.value_bytes": b"1040000"})
    reader = FakeReader([_dead(0, b"x" * 200), body_less, _dead(2)])
    summary = Summary("g", dry_run=False)
    replayer._replay(reader, producer, summary)  # type: ignore[arg-type]
    # Then both are skipped and counted, the third is replayed, and no transaction was aborted
    assert [k for _t, k, _v, _h in producer.committed] == [b"k2"]
    assert summary.unsendable == {"schema": 2} and summary.replayed == {"schema": 1}
    assert "abort" not in producer.calls and producer.committed_offsets == [(DLQ, 0, 3)]


def test_an_interrupted_replay_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    replayer = _replayer(monkeypatch)
    producer = TxnProducer()
    reader = FakeReader([_dead(i) for i in range(30)])
    summary = Summary("g", dry_run=False)
    real_take = reader.take

    def take_then_stop(n: int, t: float) -> list[Message]:
        replayer.request_stop()  # SIGTERM arrives during the first batch
        return real_take(n, t)

    reader.take = take_then_stop  # type: ignore[method-assign]
    replayer._replay(reader, producer, summary)  # type: ignore[arg-type]
    assert summary.interrupted and summary.replayed == {"schema": 10}


def test_a_refused_write_is_one_line_naming_the_acl(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a target topic this principal may not write to
    replayer = _replayer(monkeypatch)
    producer = TxnProducer()
    producer.refuse_topics["in"] = KafkaError(
        KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed"
    )
    replayer._client_log.log(3, 'Failed to add partition "in" [0] to transaction: Broker: Topic authorization failed')
    replayer._producer = lambda: producer  # type: ignore[method-assign]
    replayer._reader = lambda: FakeReader([_dead(0)])  # type: ignore[method-assign,assignment,return-value]
    replayer.consumer = type("C", (), {"consumer_group_metadata": lambda s: object(), "close": lambda s: None})()  # type: ignore[assignment]
    # When the run's transaction is refused, then it ends with the line that names the ACL
    with pytest.raises(KafkaAccessError, match="missing ACL: WRITE on topic in"):
        replayer.run()
    assert producer.calls.count("begin") == 1, "not retried: waiting cannot fix a missing ACL"


def test_the_cli_exits_non_zero_when_a_replay_is_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupted:
        def __init__(self, *_a: object, **_kw: object) -> None: ...

        def request_stop(self) -> None: ...

        def run(self, dry_run: bool = False) -> Summary:
            summary = Summary("g", dry_run)
            summary.replayed["schema"] = 10
            summary.interrupted = True
            return summary

    monkeypatch.setattr("worker.replay.Replayer", Interrupted)
    result = CliRunner().invoke(cli.app, ["replay", "--from", "dlq", "--to", "in"])
    assert result.exit_code == cli.EXIT_INTERRUPTED, result.output
    assert "replayed" in result.output and "interrupted" in result.output
