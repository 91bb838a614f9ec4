"""The same pipeline as a faust-streaming agent, for teams whose topology is already Faust.

Nothing is re-implemented here: records go through `worker.pipeline.Pipeline` (decode, classify,
route, dead-letter), the observability hooks and `worker.housekeeping` (lag,
topic checks). The agent batches with `take_events` on a `noack()` stream, runs the CPU-bound
pipeline in a worker thread so the event loop keeps heartbeating, and sends every output,
retrying what failed until it is acknowledged; only then are the batch's events acknowledged,
and Faust commits them at the commit interval — at-least-once. A batch left any other way (a
refusal, an unexpected error, a shutdown) keeps its acknowledgements withheld, so its offsets are
never committed. The input is read `read_committed` whatever the delivery mode.

`CW_DELIVERY=exactly_once` is refused: Faust's own exactly_once, driven as below, lost records in
the kill -9 chaos test (docs/engines.md); `CW_FAUST_EOS_TRIAL=true` runs it anyway, for
reproducing that trial. It has one transactional producer per input partition, whose transaction
Faust commits with that partition's offsets. Three things Faust leaves to its agents are done
here: each output joins the transaction of its *source* record's partition (Faust's
`TransactionManager.send` picks the output's own partition), a commit waits for the batch being
delivered, and a revocation aborts the open transactions (Faust keeps those of the partitions it
keeps while it rewinds them to their committed offsets) and drops the events fetched before it.
This is the only module that imports faust, so `import worker` never pulls it in.

Kafka settings: the librdkafka properties of `CW_KAFKA__*` that Faust/aiokafka have an
equivalent for are mapped (`MAPPED`, `kafka_options`), the SASL/TLS ones onto aiokafka's
(`KafkaSecurity`); any other makes the engine refuse to start, naming it, rather than run
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, cast

import aiokafka.codec
import faust
from aiokafka.errors import (
    BrokerResponseError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from confluent_kafka import KafkaError
from faust.exceptions import ProducerSendError
from faust.transport.consumer import TopicPartitionGroup, TransactionManager
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types.enums import ProcessingGuarantee

from worker.config import CONSUMER_FETCH_DEFAULTS, SECURITY_KEYS, KafkaSecurity, LibrdkafkaValue, Settings
from worker.errors import ConfigError, InferenceError, KafkaAccessError, WorkerError
from worker.housekeeping import Housekeeping
from worker.kafka_errors import Resources, check_access, check_consumer_access, explain
from worker.kafka_util import Backoff
from worker.observability import Hooks
from worker.pipeline import Outcome, Pipeline, max_record_bytes, refused_stand_in
from worker.records import Outgoing, Record
from worker.topics import ensure_for, required_topics

log = logging.getLogger(__name__)

#: How often the liveness stamp is considered (`Health.STALE_AFTER_S` is far longer).
LIVENESS_INTERVAL_S = 1.0
#: A batch in hand longer than this is stuck: one classifier call takes well under a second, one
#: round of sends at most the producer's request timeout (30 s by default) before it is retried.
STUCK_S = 60.0

#: The SASL mechanisms aiokafka implements with a username and password.
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def exactly_once(settings: Settings) -> bool:
    """`CW_DELIVERY=exactly_once` asked for explicitly (left at its default, the Faust engine
    runs at-least-once)."""
    return settings.delivery == "exactly_once" and "delivery" in settings.model_fields_set


def check_delivery(settings: Settings) -> None:
    """The Faust engine is at-least-once. `CW_DELIVERY=exactly_once` asked for explicitly is
    refused rather than silently downgraded: Faust's exactly_once, as this engine drives it, lost
    records in the kill -9 chaos test (docs/engines.md); `CW_FAUST_EOS_TRIAL=true` runs it anyway."""
    if exactly_once(settings) and not settings.faust_eos_trial:
        raise ConfigError(
            "the faust engine is at-least-once: set CW_DELIVERY=at_least_once, or use the confluent "
            "engine for exactly-once (Faust's own exactly_once failed the chaos test: docs/engines.md)"
        )


def create_app(settings: Settings) -> faust.App:
    """A Faust app configured from our settings (raw bytes in and out, no web server, no tables);
    Faust's own exactly_once only on trial (`check_delivery`)."""
    check_delivery(settings)
    options = kafka_options(settings)
    return faust.App(
        settings.kafka.group_id,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        store="memory://",
        # A stop commits what was acknowledged and no more: waiting for every fetched message to
        # be acknowledged first would wait forever for a batch the classifier withheld.
        stream_wait_empty=False,
        # One commit per interval, or sooner after this many messages, as the confluent engine
        broker_commit_interval=settings.commit.interval_ms / 1000,
        broker_commit_every=settings.commit.max_items,
        processing_guarantee="exactly_once" if exactly_once(settings) else "at_least_once",
        **options.app,
        **_credentials(settings),
    )


@dataclasses.dataclass(frozen=True)
class KafkaOptions:
    """Our Kafka settings in Faust's terms: `faust.App` settings, and the aiokafka consumer
    arguments Faust has no setting for (`consumer`)."""

    app: dict[str, Any]
    consumer: dict[str, Any]


def _seconds(ms: LibrdkafkaValue) -> float:
    return float(ms) / 1000


def _offset_reset(value: LibrdkafkaValue) -> str:
    named = {"smallest": "earliest", "beginning": "earliest", "largest": "latest", "end": "latest", "error": "none"}
    return named.get(str(value), str(value))


def _compression(value: LibrdkafkaValue) -> str | None:
    codec = str(value).lower()
    if codec == "none":
        return None
    if codec not in _CODECS or not _CODECS[codec]():
        raise ConfigError(
            f"the faust engine's producer (aiokafka) cannot compress with {codec}: its codec is not installed"
        )
    return codec


def _acks(value: LibrdkafkaValue) -> int:
    if str(value).lower() not in ("all", "-1"):
        raise ConfigError(
            f"acks={value}: the faust engine's producer writes with acks=all, so an acknowledged output survives"
            " a leader change (its input's offset is committed after the acknowledgement)"
        )
    return -1


_CODECS: dict[str, Callable[[], bool]] = {
    "gzip": aiokafka.codec.has_gzip,
    "snappy": aiokafka.codec.has_snappy,
    "lz4": aiokafka.codec.has_lz4,
    "zstd": aiokafka.codec.has_zstd,
}

#: librdkafka property -> (where it applies, Faust app setting or aiokafka consumer argument,
#: conversion). "consumer" targets are aiokafka consumer arguments Faust has no setting for.
#: docs/engines.md has this table in words.
MAPPED: dict[str, tuple[str, tuple[str, ...], Callable[[LibrdkafkaValue], Any]]] = {
    "bootstrap.servers": ("app", ("broker",), lambda v: "kafka://" + str(v).replace(",", ";kafka://")),
    "client.id": ("app", ("broker_client_id",), str),
    "session.timeout.ms": ("app", ("broker_session_timeout",), _seconds),
    "heartbeat.interval.ms": ("app", ("broker_heartbeat_interval",), _seconds),
    "max.poll.interval.ms": ("app", ("broker_max_poll_interval",), _seconds),
    "socket.timeout.ms": ("app", ("broker_request_timeout",), _seconds),
    "metadata.max.age.ms": ("app", ("consumer_metadata_max_age_ms", "producer_metadata_max_age_ms"), int),
    "connections.max.idle.ms": ("app", ("consumer_connections_max_idle_ms", "producer_connections_max_idle_ms"), int),
    "check.crcs": ("app", ("broker_check_crcs",), lambda v: str(v).lower() in ("true", "1")),
    "auto.offset.reset": ("app", ("consumer_auto_offset_reset",), _offset_reset),
    "group.instance.id": ("app", ("consumer_group_instance_id",), str),
    "max.partition.fetch.bytes": ("app", ("consumer_max_fetch_size",), int),
    "fetch.message.max.bytes": ("app", ("consumer_max_fetch_size",), int),
    "fetch.wait.max.ms": ("consumer", ("fetch_max_wait_ms",), int),
    "fetch.min.bytes": ("consumer", ("fetch_min_bytes",), int),
    "fetch.max.bytes": ("consumer", ("fetch_max_bytes",), int),
    "linger.ms": ("app", ("producer_linger",), _seconds),
    "queue.buffering.max.ms": ("app", ("producer_linger",), _seconds),
    "compression.type": ("app", ("producer_compression_type",), _compression),
    "compression.codec": ("app", ("producer_compression_type",), _compression),
    "batch.size": ("app", ("producer_max_batch_size",), int),
    "message.max.bytes": ("app", ("producer_max_request_size",), int),
    # aiokafka's producer has one timeout for a produce request and for a record's delivery
    "request.timeout.ms": ("app", ("producer_request_timeout",), _seconds),
    "delivery.timeout.ms": ("app", ("producer_request_timeout",), _seconds),
    "message.timeout.ms": ("app", ("producer_request_timeout",), _seconds),
    "acks": ("app", ("producer_acks",), _acks),
    "request.required.acks": ("app", ("producer_acks",), _acks),
}
#: Accepted and fixed by the engine whatever their value, as the confluent engine fixes them:
#: the group is the app's, offsets are committed after delivery, input is read committed, and
#: idempotence is off (see `_Producer`).
FIXED = frozenset(
    {"group.id", "enable.auto.commit", "enable.auto.offset.store", "isolation.level", "enable.idempotence"}
)


def kafka_options(settings: Settings) -> KafkaOptions:
    """Map `CW_KAFKA__*` onto Faust/aiokafka: our defaults first, then `config`, then the
    consumer- and producer-only sections, as `Settings.librdkafka_*` order them (of two keys
    with one target, the later wins). `ConfigError` names every setting with no equivalent,
    rather than run without it."""
    kafka = settings.kafka
    given: list[tuple[str, str, LibrdkafkaValue]] = [
        ("", "bootstrap.servers", kafka.bootstrap_servers),
        ("", "client.id", f"classify-worker-{kafka.instance_id}"),
        ("", "session.timeout.ms", kafka.session_timeout_ms),
        ("", "auto.offset.reset", "earliest"),
        ("", "linger.ms", 5),
        # a send failure surfaces within librdkafka's request timeout, not Faust's 20 minutes
        ("", "request.timeout.ms", 30_000),
        *(("", k, v) for k, v in CONSUMER_FETCH_DEFAULTS.items()),
        *(("", k, v) for k, v in kafka.config.items() if k not in SECURITY_KEYS),
        *(("consumer_config.", k, v) for k, v in kafka.consumer_config.items()),
        *(("producer_config.", k, v) for k, v in kafka.producer_config.items()),
    ]
    unmapped = sorted(f"{where}{k}" for where, k, _ in given if k not in MAPPED and k not in FIXED)
    if unmapped:
        raise ConfigError(f"the faust engine cannot apply these Kafka settings: {', '.join(unmapped)}")
    options = KafkaOptions(app={}, consumer={"isolation_level": "read_committed"})
    for _, key, value in given:
        if key in FIXED:
            continue
        side, names, convert = MAPPED[key]
        for name in names:
            (options.app if side == "app" else options.consumer)[name] = convert(value)
    return options


class _Consumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, with `overrides` applied to the aiokafka consumer it creates,
    and `on_commit` told of every commit that succeeded (the offsets committed)."""

    def __init__(
        self,
        *args: Any,
        overrides: dict[str, Any],
        on_commit: Callable[[dict[Any, int]], None],
        delivering: asyncio.Lock,
        **kwargs: Any,
    ) -> None:
        # before super(): it creates the thread
        self.overrides, self._on_commit, self._delivering = overrides, on_commit, delivering
        super().__init__(*args, **kwargs)

    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _commit(self, offsets: Any) -> bool:
        committed = bool(await super()._commit(offsets))
        if committed:
            self._on_commit(dict(offsets))
        return committed

    async def _commit_tps(self, tps: Any, start_new_transaction: bool) -> bool:
        """Under exactly-once, a commit ends each partition's transaction with whatever was sent
        in it so far: it waits until the batch in hand is delivered and acknowledged before it
        reads the acknowledged offsets, or it would commit that batch's outputs without them.
        None during a rebalance: `_abort_transactions` ends the transactions, Faust begins new
        ones once the partitions are assigned."""
        if not self.in_transaction:
            return bool(await super()._commit_tps(tps, start_new_transaction))
        async with self._delivering:
            if self.app.rebalancing:  # the transactions are being aborted or not yet begun
                return False
            return bool(await super()._commit_tps(tps, start_new_transaction))

    async def _commit_offsets(self, offsets: Any, start_new_transaction: bool = True) -> bool:
        """Under exactly-once the offsets go through the transactions (not `_commit`)."""
        assigned = self.assignment()
        committed = bool(await super()._commit_offsets(offsets, start_new_transaction=start_new_transaction))
        if committed and self.in_transaction:
            self._on_commit({tp: o for tp, o in offsets.items() if tp in assigned})
        return committed


class _Producer(aiokafka_driver.Producer):
    """acks=all, and not idempotent: aiokafka's idempotent producer cannot recover from a batch
    the broker refuses (a record over the topic's `max.message.bytes`): every later batch of that
    partition then fails with OutOfOrderSequenceNumber, for good (seen in
    `test_an_output_too_large_for_its_topic_loses_nothing`). Without idempotence aiokafka keeps
    one request in flight per broker, so a retry does not reorder outputs; it may duplicate one,
    which at-least-once allows."""

    def _settings_extra(self) -> Any:
        if self.app.in_transaction:  # a transactional producer is idempotent
            return super()._settings_extra()
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": False}


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> Any:
        """Faust builds the aiokafka consumer from its settings with a fixed isolation level
        and fetch wait; these are read only when the consumer starts (its fetcher), so they are
        set on the consumer between its creation and its start. A renamed attribute in a later
        aiokafka fails here, loudly, instead of being ignored."""
        consumer = super()._create_worker_consumer(transport)
        for name, value in cast(_Consumer, self.consumer).overrides.items():
            if not hasattr(consumer, f"_{name}"):
                raise ConfigError(f"this aiokafka has no consumer setting {name}: cannot apply it")
            setattr(consumer, f"_{name}", value)
        return consumer


def _install_clients(
    app: faust.App,
    overrides: dict[str, Any],
    on_commit: Callable[[dict[Any, int]], None],
    delivering: asyncio.Lock,
) -> None:
    """Make the app's consumer and producer ours (this app only). The consumer is shared by every
    agent of the app, so an embedding app's other agents read committed data too."""
    for transport in (app.transport, app.producer_transport):
        if not isinstance(transport, aiokafka_driver.Transport):
            raise ConfigError(f"the faust engine needs Faust's aiokafka transport (kafka://), not {type(transport)}")
    consumer = functools.partial(_Consumer, overrides=overrides, on_commit=on_commit, delivering=delivering)
    app.transport.Consumer = consumer  # type: ignore[misc,assignment]  # an instance attribute: this app only
    for transport in (app.transport, app.producer_transport):  # the app's producer comes from the first
        transport.Producer = _Producer  # type: ignore[misc]


def _credentials(settings: Settings) -> dict[str, Any]:
    """`broker_credentials` for faust.App from our Kafka security settings; `ConfigError` for
    any aiokafka cannot apply, so a worker never runs with less security than it was configured with."""
    sec = settings.kafka.security()
    context = _tls_context(sec) if sec.tls else None
    if not sec.sasl:
        return {"broker_credentials": faust.SSLCredentials(context)} if context else {}
    if sec.mechanism not in PASSWORD_MECHANISMS:
        raise ConfigError(f"the faust engine supports SASL {', '.join(PASSWORD_MECHANISMS)}, not {sec.mechanism}")
    if sec.username is None or sec.password is None:
        raise ConfigError("SASL needs sasl.username in CW_KAFKA__CONFIG and CW_KAFKA__SASL_PASSWORD")
    credentials = faust.SASLCredentials(
        username=sec.username,
        password=sec.password.get_secret_value(),
        ssl_context=context,
        mechanism=sec.mechanism,
    )
    return {"broker_credentials": credentials}


def _tls_context(sec: KafkaSecurity) -> ssl.SSLContext:
    """What librdkafka does with the same settings: trust `ssl.ca.location` (else the system
    store), present a client certificate when one is given, check the broker's host name."""
    try:
        context = ssl.create_default_context(cafile=str(sec.ca_location) if sec.ca_location else None)
        if sec.certificate_location:
            key_password = sec.key_password.get_secret_value() if sec.key_password else None
            context.load_cert_chain(sec.certificate_location, sec.key_location, key_password)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files in CW_KAFKA__CONFIG: {e}") from e
    context.check_hostname = sec.verify_hostname
    return context


class FaustClassifier:
    """Adds the classification agent to a Faust app: `FaustClassifier(app, settings, pipeline)`.

    Embeddable: it never ends the process. When the cluster refuses it (`KafkaAccessError`) or
    an unexpected error occurs, the agent stops without acknowledging the batch in hand, sets
    `error` and calls `on_error(error)`; the app and its other agents run on."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        pipeline: Pipeline,
        hooks: Hooks | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        check_delivery(settings)
        guarantee = cast(Any, app.conf).processing_guarantee  # typed as the enum class in Faust's stub
        if exactly_once(settings) and guarantee != ProcessingGuarantee.EXACTLY_ONCE:
            raise ConfigError("CW_DELIVERY=exactly_once needs a Faust app with processing_guarantee='exactly_once'")
        self.app = app
        self.settings = settings
        self.pipeline = pipeline
        self.hooks = hooks or Hooks()
        self.processed = 0
        #: Why the agent stopped (`KafkaAccessError` when the cluster refused it), else None.
        self.error: Exception | None = None
        self._on_error = on_error
        self._resources = Resources.of(settings, required_topics(settings, pipeline.router))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classify")
        self._topics: dict[str, faust.TopicT] = {}
        #: Delivered batches whose offsets Faust has not committed yet, oldest first.
        self._uncommitted: deque[_Delivered] = deque()
        self._assigned: set[tuple[str, int]] = set()
        #: monotonic time the batch in hand was taken; None while waiting for input
        self._busy_since: float | None = None
        #: Revocations seen, and how many there had been when the batch in hand was taken
        self._rebalances = self._batch_rebalances = 0
        #: Held while a batch's outputs are sent (exactly-once: no commit meanwhile, `_Consumer`)
        self._delivering = asyncio.Lock()
        _install_clients(app, kafka_options(settings).consumer, self._on_commit, self._delivering)
        # the lag is the app's group's: an embedding app's id, not necessarily CW_KAFKA__GROUP_ID
        group = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"group_id": app.conf.id})})
        self._housekeeping = Housekeeping(group, pipeline.router, self.hooks, lambda: set(self._assigned))
        self._source = self._raw_topic(settings.topics.input)
        self.agent = app.agent(self._source, name="classify-worker")(self._classify)
        app.timer(LIVENESS_INTERVAL_S)(self._stamp_liveness)
        app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]  # mode's stub is narrower
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]

    @property
    def busy(self) -> bool:
        """A batch in hand, or delivered and not yet committed: not idle."""
        return self._busy_since is not None or bool(self._uncommitted)

    async def _stamp_liveness(self) -> None:
        """`/healthz` follows the agent: alive while it waits for input or its batch is younger
        than `STUCK_S`; not once it has stopped (an error) or a batch is stuck (a classifier
        call that never returns). A blocked event loop stamps nothing either."""
        busy = self._busy_since is not None and time.monotonic() - self._busy_since > STUCK_S
        if self.error is None and not busy:
            self.hooks.on_loop()

    def _on_commit(self, offsets: dict[Any, int]) -> None:
        """Faust committed `offsets`: report (metrics) and count the batches now durable."""
        for tp, offset in offsets.items():
            for batch in self._uncommitted:
                batch.ends.pop((tp.topic, tp.partition), None) if batch.ends.get(
                    (tp.topic, tp.partition), offset + 1
                ) <= offset else None
        now_ms = int(time.time() * 1000)
        while self._uncommitted and not self._uncommitted[0].ends:
            batch = self._uncommitted.popleft()
            self.hooks.on_batch(batch.outcome)
            self.hooks.on_committed(batch.sent, now_ms)
            self.processed += batch.records

    def _mine(self, tps: Any) -> list[tuple[str, int]]:
        return sorted((tp.topic, tp.partition) for tp in tps if tp.topic == self.settings.topics.input)

    async def _on_assigned(self, _sender: Any, *args: Any, **_: Any) -> None:
        mine = self._mine(args[0])
        self._assigned |= set(mine)
        log.info("partitions assigned", extra={"partitions": [p for _, p in mine]})
        self.hooks.on_assign(mine)

    async def _on_revoked(self, _sender: Any, *args: Any, **_: Any) -> None:
        mine = self._mine(args[0])
        self._rebalances += 1  # first: a batch being delivered stops at its next send
        if self.app.in_transaction:
            async with self._delivering:  # no commit, no batch's sends meanwhile
                await self._abort_transactions(mine)
        self._assigned -= set(mine)
        # their uncommitted batches are processed again by the partitions' next owner, and counted there
        self._uncommitted = deque(b for b in self._uncommitted if not set(b.ends) & set(mine))
        log.info("partitions revoked", extra={"partitions": [p for _, p in mine]})
        self.hooks.on_revoke(mine)

    def _raw_topic(self, name: str) -> faust.TopicT:
        # bytes in, bytes out, whatever serializers the host app defaults to
        return self.app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def _topic(self, name: str) -> faust.TopicT:
        if name not in self._topics:
            self._topics[name] = self._raw_topic(name)
        return self._topics[name]

    async def _classify(self, stream: Any) -> None:  # faust.Stream: take_events is not on StreamT
        """The agent. Faust acknowledges what the stream yields whenever it is iterated with acks
        on, so the agent iterates a `noack()` stream and acknowledges each batch itself (in
        `take_events`) only after its outputs are delivered."""
        if exactly_once(self.settings) and not self.app.in_transaction:
            await self._stop_for_good(
                ConfigError("CW_DELIVERY=exactly_once needs the app run by faust.Worker (`app.main()`)")
            )
        self._housekeeping.start()
        try:
            await self._batches(stream.noack())
        finally:
            self._housekeeping.stop()

    async def _batches(self, stream: Any) -> None:
        batch = self.settings.batch
        async for events in stream.take_events(batch.max_items, within=batch.max_wait_ms / 1000 or 0.001):
            fresh = self._fresh(events)
            if not fresh:
                continue
            delivered = False
            self._busy_since = time.monotonic()
            try:
                records = [_record(e.message) for e in fresh]
                outcome = await self._process_until_it_works(records)
                async with self._delivering:
                    sent = await self._deliver(outcome.outgoing)
                delivered = True
            except _RebalancedError:
                log.info("batch dropped: a rebalance ended its transactions", extra={"size": len(fresh)})
            except Exception as e:
                await self._stop_for_good(e)
            finally:
                if not delivered:  # an error, a refusal, a rebalance or a shutdown mid-batch
                    _withhold_acks(fresh)
            self._busy_since = None
            if delivered:  # acknowledged when this body returns (take_events), committed by Faust later
                self._uncommitted.append(_Delivered(_ends(records), outcome, sent, len(records)))

    def _fresh(self, events: Any) -> list[Any]:
        """The batch's events, less (exactly-once) those fetched before the last rebalance:
        Faust's revocation ends every partition's transaction and its assignment seeks each
        partition back to its committed offset, so these are fetched again; processed here too,
        their outputs would be committed twice. Their acknowledgements are withheld."""
        self._batch_rebalances = self._rebalances
        if not self.app.in_transaction:
            return list(events)
        generation = self.app.consumer_generation_id
        fresh: list[Any] = []
        stale: list[Any] = []
        for e in events:
            m = e.message
            current = m.generation_id == generation and (m.topic, m.partition) in self._assigned
            (fresh if current else stale).append(e)
        _withhold_acks(stale)
        return fresh

    def _check_not_rebalanced(self) -> None:
        """`_RebalancedError` when a rebalance began since the batch in hand was taken
        (exactly-once: its transactions are gone)."""
        if self.app.in_transaction and self._rebalances != self._batch_rebalances:
            raise _RebalancedError

    async def _deliver(self, outgoing: list[Outgoing]) -> list[Outgoing]:
        """Send every output and wait until each is acknowledged, retrying what failed (with
        backoff) until it is; returns what was delivered. An output found too large (by the
        producer, or by the broker, which judges a whole batch) is sent again on its own, then,
        still too large, replaced by a dead letter without its body. Only a refusal (a missing
        ACL) or a record too large even without its body gives up, by raising."""
        backoff = Backoff(self.hooks.on_loop)
        delivered: list[Outgoing] = []
        pending = [(out, False) for out in outgoing]  # (output, send it on its own)
        while pending:
            self._check_not_rebalanced()
            failed = await self._send_all(pending)
            delivered += [out for out, _ in pending if all(out is not f for f, _, _ in failed)]
            pending, transient = [], None
            for out, alone, error in failed:
                if isinstance(error, TOO_LARGE):
                    pending.append((self._too_large_stand_in(out, error), True) if alone else (out, True))
                    continue
                if isinstance(error, BrokerResponseError):
                    self._raise_if_refused(error)
                pending.append((out, alone))
                transient = error
            if transient is not None:
                delay_s = backoff.step()
                log.warning(
                    "outputs not delivered; retrying",
                    extra={"error": repr(transient), "outputs": len(pending), "retry_in_s": delay_s},
                )
                self.hooks.on_batch_failed("delivery")
                self._housekeeping.check_topics_soon()  # an output topic deleted under us is recreated
                await asyncio.sleep(delay_s)
        return delivered

    def _too_large_stand_in(self, out: Outgoing, error: Exception) -> Outgoing:
        message = f"the {out.kind} output to {out.topic} is too large for Kafka ({type(error).__name__})"
        return refused_stand_in(out, self.settings.topics.dlq, "too_large", message, max_record_bytes(self.settings))

    async def _send_all(self, pending: list[tuple[Outgoing, bool]]) -> list[tuple[Outgoing, bool, Exception]]:
        """Send `pending` (together, then those marked to go alone one by one); what failed."""
        together = [out for out, alone in pending if not alone]
        results = await asyncio.gather(*map(self._send, together), return_exceptions=True)
        failed = []
        for out, result in zip(together, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, Exception):
                failed.append((out, False, _cause(result)))
        for out in (out for out, alone in pending if alone):  # one record per produce request
            try:
                await self._send(out)
            except Exception as e:
                failed.append((out, True, _cause(e)))
        return failed

    async def _send(self, out: Outgoing) -> None:
        """One output, awaited until acknowledged. Not `topic.send`: that attaches the message
        to the current event under Faust's stream_publish_on_commit, and on failure leaves the
        error on a second future nobody awaits (logged with the message body)."""
        headers = cast(Any, list(out.headers))  # Faust's stub says bytes; Kafka and aiokafka take None
        if self.app.in_transaction:
            await self._send_in_transaction(out, headers)
            return
        topic = self._topic(out.topic)
        pending = topic.as_future_message(key=out.key, value=out.value, headers=headers)
        await topic.publish_message(pending, wait=True)

    async def _send_in_transaction(self, out: Outgoing, headers: Any) -> None:
        """Exactly-once: the output joins the transaction of its source record's partition,
        the one Faust commits that partition's offsets in. Not `publish_message`: Faust's
        `TransactionManager.send` picks the transaction of the partition the output goes to
        in its own topic, which is another input partition's (or none of this worker's)."""
        self._check_not_rebalanced()
        transactional_id = self._transactional_id(out.source.topic, out.source.partition)
        producer = self.app.consumer.transactions.producer
        pending = await producer.send(
            out.topic, out.key, out.value, None, None, headers, transactional_id=transactional_id
        )
        await pending

    def _transactional_id(self, topic: str, partition: int) -> str:
        """The transactional id Faust's `TransactionManager` gives an input partition."""
        group = self.app.assignor.group_for_topic(topic)
        transactions = cast(TransactionManager, self.app.consumer.transactions)
        return transactions.transactional_id_format.format(
            group_id=self.app.conf.id, tpg=TopicPartitionGroup(topic, partition, group)
        )

    async def _abort_transactions(self, partitions: list[tuple[str, int]]) -> None:
        """Exactly-once, on revocation: Faust stops the producers of the partitions that move
        away, but keeps the open transaction of each partition this worker keeps, while its
        assignment seeks every partition back to its committed offset: the outputs of batches
        acknowledged since the last commit would be committed again with their re-processing.
        Aborted here, they are sent once more, once."""
        producer = self.app.consumer.transactions.producer
        for topic, partition in partitions:
            await producer.abort_transaction(self._transactional_id(topic, partition))

    def _raise_if_refused(self, e: BrokerResponseError) -> None:
        """`KafkaAccessError` naming the missing ACL when the cluster refused a send (aiokafka's
        errno is Kafka's error code): retrying cannot help."""
        named = [a for a in e.args if isinstance(a, str) and a in self._resources.outputs]  # aiokafka's topic
        cause = explain(KafkaError(e.errno, str(e)), self._resources, "producer", named)
        if cause is not None:
            raise KafkaAccessError(cause) from e

    async def _stop_for_good(self, e: Exception) -> NoReturn:
        """A refusal or an unexpected error: the agent stops processing for good, the batch in
        hand unacknowledged, and the error goes to whoever embeds it (`error`, `on_error`); the
        process and the app's other agents run on. The agent then waits, inside the batch, until
        the app stops: leaving it would let `take_events` take (and later acknowledge) more, and
        raising would have Faust's supervisor restart the agent past the withheld batch."""
        self.error = e
        log.error("classifier agent stopped", extra={"error": str(e)}, exc_info=not isinstance(e, WorkerError))
        if self._on_error is not None:
            self._on_error(e)
        await asyncio.Event().wait()  # cancelled when the app stops
        raise AssertionError("unreachable: nothing sets this event")

    async def _process_until_it_works(self, records: list[Record]) -> Any:
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await loop.run_in_executor(self._executor, self.pipeline.process, records)
            except InferenceError as e:
                log.error("classifier failed on a batch; will retry", extra={"error": str(e), "size": len(records)})
                self.hooks.on_batch_failed("inference")
                await asyncio.sleep(backoff.step())


class _RebalancedError(Exception):
    """Exactly-once: a rebalance ended the transactions the batch in hand was sent in."""


@dataclasses.dataclass
class _Delivered:
    """A batch whose outputs were acknowledged: the offsets a commit must reach (next offset per
    partition, dropped as commits reach them), its outcome, what was sent, its input count."""

    ends: dict[tuple[str, int], int]
    outcome: Outcome
    sent: list[Outgoing]
    records: int


def _ends(records: list[Record]) -> dict[tuple[str, int], int]:
    ends: dict[tuple[str, int], int] = {}
    for r in records:
        ends[(r.topic, r.partition)] = max(ends.get((r.topic, r.partition), 0), r.offset + 1)
    return ends


#: What aiokafka raises for a record too large: the producer's own check (max_request_size), or
#: the broker's (the topic's max.message.bytes, for a record or a whole batch).
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


def _cause(e: Exception) -> Exception:
    """aiokafka's error inside Faust's `ProducerSendError`."""
    cause = e.__cause__
    return cause if isinstance(e, ProducerSendError) and isinstance(cause, Exception) else e


def _withhold_acks(events: Any) -> None:
    """Keep Faust from committing these events' offsets. `take_events` acknowledges every event
    of a batch when the agent leaves it, even by an exception or a cancellation; an event whose
    message is already marked acknowledged is skipped there, so its offset never reaches the
    consumer's acknowledged set, and Faust commits each partition only up to its first offset
    not acknowledged. The batch is consumed again after a restart or a rebalance."""
    for event in events:
        event.message.acked = True


def _record(message: Any) -> Record:
    ts = message.timestamp
    return Record(
        value=message.value,
        key=message.key,
        headers=list(message.headers or []),
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(ts * 1000) if ts else None,
    )


def run(
    settings: Settings,
    pipeline: Pipeline,
    hooks: Hooks,
    max_messages: int | None = None,
    idle_exit_s: float | None = None,
) -> int:
    """`classify-worker run --engine faust`: a Faust worker until SIGTERM, `max_messages` or idle."""
    import mode

    app = create_app(settings)  # first: refuses a setting it cannot apply before connecting
    # Faust turns its exactly_once on only in an app run by `faust.Worker`, which sets this flag;
    # under `mode.Worker` it would silently run at-least-once.
    app.in_worker = True
    check_access(settings)
    if settings.topics.auto_create:
        ensure_for(settings, pipeline.router)
    check_consumer_access(settings)  # aiokafka would retry a refused group or topic in silence
    classifier = FaustClassifier(app, settings, pipeline, hooks, on_error=lambda _: _graceful_stop())
    state = {"last": time.monotonic(), "seen": 0}

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def bounded_run() -> None:
        if classifier.busy or classifier.processed != state["seen"]:
            state.update(last=time.monotonic(), seen=classifier.processed)
        done = max_messages is not None and classifier.processed >= max_messages
        idle = idle_exit_s is not None and time.monotonic() - state["last"] > idle_exit_s
        if done or idle:
            log.info("bounded run finished", extra={"processed": classifier.processed, "idle": idle})
            _graceful_stop()

    worker = mode.Worker(app, loglevel=settings.log_level, override_logging=False, quiet=True)
    with contextlib.suppress(SystemExit):  # mode exits the process's loop with SystemExit(0)
        worker.execute_from_commandline()
    if classifier.error is not None:
        raise classifier.error  # the CLI maps it to its exit code
    return classifier.processed


def _graceful_stop() -> None:
    """mode's own graceful shutdown: commit what was acknowledged, leave the group."""
    os.kill(os.getpid(), signal.SIGTERM)
