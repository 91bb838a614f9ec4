"""Kafka errors that waiting cannot fix, each turned into one line that names the cause.

librdkafka reports a refused login, an untrusted certificate, the wrong security protocol or a
missing ACL through four channels (the error callback, the log callback, a consumed message's
error, an exception), in text written for its own developers: "Broker: Topic authorization
failed" names no topic, and a transaction that failed on a denied topic may surface only as
"Local: Erroneous state". A worker that logs these and retries waits forever in silence; one
that crashes prints a traceback. Here they become `KafkaAccessError` with a line such as
"missing ACL: WRITE on topic classify.dlq", and the CLI exits `EXIT_ACCESS` so the
orchestrator's restart backoff becomes the slow retry that an operator's fix ends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from worker.config import Settings
from worker.errors import KafkaAccessError
from worker.kafka_util import Backoff

__all__ = [
    "ClientLog",
    "KafkaAccessError",
    "Resources",
    "check_access",
    "check_consumer_access",
    "explain",
    "kafka_error_of",
]
log = logging.getLogger(__name__)

#: How long the start-up check waits for metadata per attempt: a healthy broker answers in
#: milliseconds, and a refused login is reported within a second of connecting.
CHECK_TIMEOUT_S = 2.0
#: How long the consumer probe fetches from the input topic's end: a refused fetch is reported
#: within a second; nothing is read (the end has no records yet) and nothing is committed.
PROBE_FETCH_S = 2.0

Side = Literal["consumer", "producer", "admin"]

#: librdkafka's log line naming the topic a transaction coordinator refused; no error code does.
_DENIED_IN_TXN = re.compile(r'Failed to add partition "([^"]+)" \[-?\d+\] to transaction: Broker: Topic authorization')
#: A plaintext client at a TLS or SASL listener: the broker closes the connection on our first
#: request. librdkafka logs it as a plain disconnect (a broker restart looks the same), so it is
#: only a hint on the "waiting for the broker" line, never a reason to exit.
_CLOSED_AT_FIRST_REQUEST = re.compile(r"Disconnected.*in state APIVERSION_QUERY")
PROTOCOL_HINT = "the broker closes every connection at its first request: a TLS or SASL listener? (security.protocol)"
_AUTHORIZATION_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


@dataclass(frozen=True)
class Resources:
    """What a worker touches, so a denial can name the ACL it lacks."""

    input_topic: str
    group: str
    transactional_id: str | None
    outputs: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings, outputs: Iterable[str] = ()) -> Resources:
        eos = settings.delivery == "exactly_once"
        return cls(
            settings.topics.input,
            settings.kafka.group_id,
            settings.transactional_id if eos else None,
            tuple(sorted(set(outputs) - {settings.topics.input})),
        )


@dataclass
class ClientLog:
    """librdkafka's `logger`: forwards each line to the `librdkafka` logger and remembers the
    topics a transaction coordinator refused, which only these lines name, and whether
    connections are closed the way a listener speaking another protocol closes them."""

    denied_topics: set[str] = field(default_factory=set)
    protocol_hint: str | None = None
    _log: logging.Logger = field(default_factory=lambda: logging.getLogger("librdkafka"))

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        self._forward(level, text)
        match = _DENIED_IN_TXN.search(text)
        if match:
            self.denied_topics.add(match.group(1))
        if _CLOSED_AT_FIRST_REQUEST.search(text):
            self.protocol_hint = PROTOCOL_HINT

    def _forward(self, level: int, text: str) -> None:
        """Repeats (a reconnect loop logs several lines a second) are left out and counted by
        the log handler's `observability.RepeatFilter`, like every other repeated line."""
        self._log.log(level, "%s", text)


def explain(err: KafkaError, res: Resources, side: Side, denied_topics: Iterable[str] = ()) -> str | None:
    """One line naming why the cluster refuses us, or None when the error may pass by itself."""
    text = err.str()
    code = err.code()
    if code == KafkaError._AUTHENTICATION:
        return _authentication(text)
    if code == KafkaError._SSL:
        return _tls(text)
    if "connecting to a PLAINTEXT broker listener" in text:
        return f"TLS is configured but the listener does not speak TLS (security.protocol mismatch): {text}"
    acl = _missing_acl(code, res, side, sorted(denied_topics))
    if acl is None:
        return None
    if code not in _AUTHORIZATION_CODES:  # a transaction refused a topic, then failed on something else
        text = f"librdkafka logged Topic authorization failed; the call then failed with: {text}"
    return f"missing ACL: {acl} for this principal ({text})"


def _authentication(text: str) -> str:
    if "invalid credentials" in text:
        cause = "wrong SASL username or password (sasl.username, CW_KAFKA__SASL_PASSWORD)"
    elif "mechanism handshake failed" in text:
        cause = "the listener does not offer this SASL mechanism (a PLAINTEXT or SSL listener, or sasl.mechanism)"
    else:
        cause = "SASL authentication failed"
    return f"authentication failed: {cause}: {text}"


def _tls(text: str) -> str:
    if "certificate verify failed" in text:
        return f"TLS: the broker's certificate is not trusted (ssl.ca.location): {text}"
    return f"TLS handshake failed: {text}"


def _missing_acl(code: int, res: Resources, side: Side, denied_topics: list[str]) -> str | None:
    if side == "producer" and denied_topics:  # whatever error the failed transaction surfaced as
        return _write_on(denied_topics)
    if code == KafkaError.GROUP_AUTHORIZATION_FAILED:
        return f"READ on group {res.group}"
    if code == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
        return f"WRITE on transactional-id {res.transactional_id}"
    if code == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
        return "CREATE on the topics to create" if side == "admin" else "IDEMPOTENT_WRITE on cluster kafka-cluster"
    if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        if side == "consumer":
            return f"READ on topic {res.input_topic}"
        if side == "admin":
            return "CREATE on the topics to create (auto-create is on)"
        return _write_on(denied_topics) if denied_topics else f"WRITE on one of the topics {', '.join(res.outputs)}"
    return None


def _write_on(denied_topics: list[str]) -> str:
    return f"WRITE on topic{'s' if len(denied_topics) > 1 else ''} {', '.join(denied_topics)}"


def kafka_error_of(exc: BaseException) -> KafkaError | None:
    """The KafkaError inside an exception or anywhere in its `raise ... from` chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__
    return None


def check_access(settings: Settings) -> None:
    """Before anything else, connect the way every client will and fetch metadata.

    A login the cluster refuses ends the start within seconds with `KafkaAccessError` (instead of a
    30 s "Timed out waiting for operation" that names neither SASL nor the listener); a broker
    that does not answer is waited for, one log line per attempt, backing off to 30 s."""
    refusals: list[str] = []
    res = Resources.of(settings)

    def on_error(err: KafkaError) -> None:
        cause = explain(err, res, "admin")
        if cause:
            refusals.append(cause)

    client_log = ClientLog()
    conf: dict[str, Any] = {**settings.librdkafka_admin(), "logger": client_log, "error_cb": on_error}
    admin = AdminClient(conf)
    backoff = Backoff()  # at most one attempt (and one log line) every 30 s
    while True:
        error = _metadata_or_refusal(admin, refusals)
        if error is None:
            return
        log.warning(
            "waiting for the broker",
            extra={
                "bootstrap": settings.kafka.bootstrap_servers,
                "error": error,
                "hint": client_log.protocol_hint,
                "retry_in_s": backoff.delay_s,
            },
        )
        backoff.wait()


def _metadata_or_refusal(admin: AdminClient, refusals: list[str]) -> str | None:
    """None once metadata arrives; `KafkaAccessError` as soon as the error callback reports a
    refusal (polled in short steps, so librdkafka's reconnects add few lines before it); else
    the last error after CHECK_TIMEOUT_S."""
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    error = "no answer"
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=0.2)
            return None
        except KafkaException as e:
            error = str(e.args[0].str() if isinstance(e.args[0], KafkaError) else e)
        admin.poll(0.05)  # serves the error callback, where a refused login is reported
        if refusals:
            raise KafkaAccessError(refusals[0])
    return error


def check_consumer_access(settings: Settings) -> None:
    """For an engine whose client retries a refused group or input topic in silence (aiokafka in
    the Faust engine): with the worker's own settings and group, fetch from the end of one input
    partition for PROBE_FETCH_S. librdkafka looks up the group's coordinator (READ on the group)
    and fetches (READ on the topic); nothing is read, nothing committed, no group joined.
    `KafkaAccessError` names what is missing; anything else is left to the engine."""
    res = Resources.of(settings)
    conf: dict[str, Any] = {**settings.librdkafka_consumer(), "logger": ClientLog()}
    consumer = Consumer(conf)
    try:
        consumer.assign([TopicPartition(settings.topics.input, 0, OFFSET_END)])
        deadline = time.monotonic() + PROBE_FETCH_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.1)
            err = message.error() if message is not None else None
            cause = explain(err, res, "consumer") if err is not None else None
            if cause is not None:
                raise KafkaAccessError(cause)
    finally:
        consumer.close()
