"""All settings in one frozen object, read from the environment (prefix `CW_`, nested with `__`)
and an optional YAML file, in exactly one place: `load_settings`.

The env names are a public contract (Helm values, compose files and users' manifests use them).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from worker.errors import ConfigError

LibrdkafkaValue = str | int | float | bool


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: The librdkafka keys `KafkaSecurity` reads: the SASL/TLS settings a client that is not
#: librdkafka (the Faust engine's aiokafka) must apply the same way.
SECURITY_KEYS = frozenset(
    {
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.key.password",
        "ssl.endpoint.identification.algorithm",
    }
)


class KafkaSecurity(_Section):
    """The SASL/TLS part of `CW_KAFKA__CONFIG` (+ `CW_KAFKA__SASL_PASSWORD`), typed and checked,
    so an engine on another client library applies exactly what librdkafka would."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: librdkafka's default mechanism is GSSAPI; we name it so an engine can refuse it clearly.
    mechanism: str = "GSSAPI"
    username: str | None = None
    password: SecretStr | None = None
    ca_location: Path | None = None
    certificate_location: Path | None = None
    key_location: Path | None = None
    key_password: SecretStr | None = None
    #: librdkafka checks the broker's host name against its certificate unless this is "none".
    verify_hostname: bool = True

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "classify-worker"
    #: Passed through to every librdkafka client (SASL/TLS, tuning); JSON object in `CW_KAFKA__CONFIG`.
    config: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    #: Consumer-only and producer-only properties, applied after `config` (librdkafka warns
    #: about a consumer property given to a producer and vice versa).
    consumer_config: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    producer_config: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    #: SASL password kept out of logs and reprs; merged as `sasl.password`.
    sasl_password: SecretStr | None = None
    #: Stable per replica (pod name): the transactional id, so a restarted replica fences its
    #: predecessor at once instead of leaving its transaction open until it times out.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)
    #: librdkafka's 45 s default makes a crashed replica's partitions wait that long; 10 s is
    #: still far above a healthy heartbeat interval (3 s).
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    #: A transaction older than this is aborted by the broker; batches take milliseconds, so a
    #: long-lived one means a stuck replica whose partitions should be released soon.
    transaction_timeout_ms: int = Field(default=60_000, ge=1000)

    def security(self) -> KafkaSecurity:
        """The SASL/TLS settings among `config`, typed; `ConfigError` names a value that is wrong."""
        c = {k: str(v) for k, v in self.config.items() if k in SECURITY_KEYS}
        fields = {
            "protocol": c.get("security.protocol", "PLAINTEXT").upper(),
            "mechanism": c.get("sasl.mechanism", c.get("sasl.mechanisms", "GSSAPI")).upper(),
            "username": c.get("sasl.username"),
            "password": self.sasl_password or c.get("sasl.password"),
            "ca_location": c.get("ssl.ca.location"),
            "certificate_location": c.get("ssl.certificate.location"),
            "key_location": c.get("ssl.key.location"),
            "key_password": c.get("ssl.key.password"),
            "verify_hostname": c.get("ssl.endpoint.identification.algorithm", "https").lower() != "none",
        }
        try:
            return KafkaSecurity.model_validate(fields)
        except ValidationError as e:
            wrong = "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors())  # never the input: a secret
            raise ConfigError(f"CW_KAFKA__CONFIG security settings: {wrong}") from e


class TopicSettings(_Section):
    input: str = "classify.in"
    prefix: str = "routed."
    fallback: str = "routed.fallback"
    dlq: str = "classify.dlq"
    partitions: int = Field(default=6, ge=1)
    replication: int = Field(default=1, ge=1)
    #: Create missing topics at start (idempotent); turn off where an operator owns topics.
    auto_create: bool = True


class BatchSettings(_Section):
    max_items: int = Field(default=256, ge=1, le=100_000)
    #: Once a batch's first message is in, how much longer to wait for more. Measured with the
    #: default model at 215 msgs/s on 2 cores: p99 75 ms with 5, 116 ms with 20 (bench/NOTES.md).
    max_wait_ms: int = Field(default=5, ge=0, le=60_000)
    #: A batch takes about this much classifier time at the measured cost per message, growing
    #: while a backlog lasts (`worker.batching`); 0: `max_items` alone bounds it.
    max_ms: int = Field(default=25, ge=0, le=60_000)


class CommitSettings(_Section):
    #: The longest a commit unit stays open: exactly-once commits as soon as nothing is in hand
    #: (no batch at the classifier or waiting to be produced), so under load, when something
    #: always is, this caps a message's wait for its commit. At-least-once commits offsets at
    #: this interval (its outputs are visible once acknowledged, before any offset commit).
    #: 50, not Kafka Streams' 100: at half load it halved the wait for the commit (p99 145-148 ->
    #: 73-74 ms) with no more broker CPU on the co-located broker (docs/performance.md).
    interval_ms: int = Field(default=50, ge=1, le=60_000)
    #: Exactly-once: the least time between the starts of two transactions' commits. Each commit
    #: costs the broker a transaction-log write and a marker per partition written to; the floor
    #: bounds that at light load, when every message would otherwise get its own transaction.
    min_interval_ms: int = Field(default=10, ge=0, le=60_000)
    #: A transaction spanning this many inbound messages commits early: bounds the work redone
    #: after an abort (at 1,600 items/s, 50 ms holds ~80).
    max_items: int = Field(default=2_000, ge=1, le=1_000_000)


class LimitSettings(_Section):
    #: Inbound values above this are dead-lettered as `too_large` before parsing.
    max_input_bytes: int = Field(default=1_000_000, ge=16)
    #: Kafka's default `max.message.bytes` (1 MiB less headroom); larger outputs are dead-lettered
    #: instead of failing the whole transaction.
    max_output_bytes: int = Field(default=1_000_000, ge=1024)
    #: Inbound bytes held awaiting their commit: exactly-once commits a unit early at this size,
    #: at-least-once pauses consuming while unacknowledged batches hold more. 64 MiB is ~400 ms
    #: at full speed with 1 KB messages (never reached), or 64 messages of 1 MB (well inside a
    #: 2 GiB pod with librdkafka's own 64 MiB fetch queue and the classifier's batch).
    max_held_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: Chunks (model windows) classified per text; a longer text is routed on its first chunks and
    #: says so in `route.truncated`. 16 chunks of the default model are ~1,500 words (a document's
    #: opening pages, where its topic is) and ~0.35 s of one core (22 ms a chunk, measured on this
    #: 2-core machine), where a 1 MB text's ~1,800 chunks took ~40 s, past the 30 s stuck threshold.
    max_chunks: int = Field(default=16, ge=1, le=10_000)
    #: `truncate` (route on the first `max_chunks`) or `dead_letter` (reason `too_long`).
    over_max_chunks: Literal["truncate", "dead_letter"] = "truncate"


#: Tokens per inference call: a single-threaded call on a few hundred tokens keeps its activations
#: in the core's L2 cache: 256 measured best, 1,024+ about 15% slower (bench/NOTES.md).
DEFAULT_TOKEN_BUDGET = 256


class ModelSettings(_Section):
    #: A bundle directory; None means the model shipped inside the package.
    path: Path | None = None
    #: Tokens per inference call; bounds memory and keeps padding waste low.
    token_budget: int = Field(default=DEFAULT_TOKEN_BUDGET, ge=64)
    #: Concurrent single-threaded inference calls; None = the cgroup CPU quota rounded down, else
    #: the affinity mask (`worker/cpus.py`), never the node's core count.
    threads: int | None = Field(default=None, ge=1, le=256)
    top_k: int = Field(default=3, ge=1, le=50)
    #: Overlap between chunks of a document longer than the model's max length.
    stride: int = Field(default=32, ge=0)


class RoutingSettings(_Section):
    #: Below this score an item goes to the fallback topic; None = the bundle's own threshold.
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class ShadowSettings(_Section):
    """A candidate bundle scored beside the live one; it never changes routing or delivery."""

    #: A bundle directory to shadow-score every batch with; None = shadow mode off.
    model_path: Path | None = None
    #: Where disagreements and per-batch tallies go, in the batch's own transaction.
    topic: str = "classify.shadow"


class MetricsSettings(_Section):
    port: int = Field(default=9108, ge=0, le=65535)
    host: str = "0.0.0.0"  # noqa: S104 - a metrics endpoint must be reachable by the scraper
    enabled: bool = True


#: Consumer fetch defaults (bench/NOTES.md §7); `CW_KAFKA__CONSUMER_CONFIG` overrides them.
#: Kafka answers a fetch as soon as one byte is there (`fetch.min.bytes` 1), so the wait only
#: bounds an empty fetch; but librdkafka sends no new fetch (after a rewind's seek, or for newly
#: assigned partitions) until the outstanding one returns: 100 ms instead of the default 500
#: caps that delay at a cost of ten empty fetches a second per broker. `queued.min.messages`
#: stays at librdkafka's 100,000: below a few batches' worth, crossing it postpones the next
#: fetch by `fetch.queue.backoff.ms` (1 s).
CONSUMER_FETCH_DEFAULTS: dict[str, LibrdkafkaValue] = {"fetch.wait.max.ms": 100, "fetch.min.bytes": 1}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CW_", env_nested_delimiter="__", frozen=True, extra="forbid", case_sensitive=False
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    batch: BatchSettings = BatchSettings()
    commit: CommitSettings = CommitSettings()
    limits: LimitSettings = LimitSettings()
    model: ModelSettings = ModelSettings()
    routing: RoutingSettings = RoutingSettings()
    shadow: ShadowSettings = ShadowSettings()
    metrics: MetricsSettings = MetricsSettings()
    delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    #: Run `CW_DELIVERY=exactly_once --engine faust` although it failed the chaos oracle
    #: (docs/engines.md): for reproducing that trial, not for production.
    faust_eos_trial: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: a Helm value or `docker run -e` overrides a baked file.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    def librdkafka_consumer(self) -> dict[str, LibrdkafkaValue]:
        return {
            **self._librdkafka_common(),
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.kafka.session_timeout_ms,
            "partition.assignment.strategy": "cooperative-sticky",
            **CONSUMER_FETCH_DEFAULTS,
            **self.kafka.config,
            **self.kafka.consumer_config,
            # must win: offsets are committed by us, after delivery, and only committed data is read
            "group.id": self.kafka.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
        }

    def librdkafka_producer(self) -> dict[str, LibrdkafkaValue]:
        exactly_once = self.delivery == "exactly_once"
        return {
            **self._librdkafka_common(),
            "linger.ms": 5,
            # gzip: the one codec every client reads without extras (kafkajs has no lz4, snappy or
            # zstd without plugins; aiokafka needs extras for lz4/snappy/zstd); 2.8x fewer bytes
            # than none for ~2-4% of a routed item's CPU (bench/NOTES.md §10)
            "compression.type": "gzip",
            "transaction.timeout.ms": self.kafka.transaction_timeout_ms,
            **self.kafka.config,
            **self.kafka.producer_config,
            # must win: duplicates from producer retries would break both delivery modes
            "enable.idempotence": True,
            **({"transactional.id": self.transactional_id} if exactly_once else {}),
        }

    def librdkafka_admin(self) -> dict[str, LibrdkafkaValue]:
        return {**self._librdkafka_common(), **self.kafka.config}

    @property
    def transactional_id(self) -> str:
        return f"{self.kafka.group_id}-{self.kafka.instance_id}"

    def _librdkafka_common(self) -> dict[str, LibrdkafkaValue]:
        secret = self.kafka.sasl_password
        return {
            "bootstrap.servers": self.kafka.bootstrap_servers,
            "client.id": f"classify-worker-{self.kafka.instance_id}",
            **({"sasl.password": secret.get_secret_value()} if secret else {}),
        }


def load_settings(yaml_file: Path | None = None, **overrides: Any) -> Settings:
    """The one place settings are read; raises `ConfigError` with a one-line summary."""
    if yaml_file is not None and not yaml_file.is_file():
        raise ConfigError(f"config file {yaml_file} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=yaml_file)

    try:
        return _FromFile(**overrides)
    except ValidationError as e:
        raise ConfigError(_summarize(e)) from e
    except SettingsError as e:  # a nested value that is not valid JSON
        raise ConfigError(f"invalid settings: {e} ({e.__cause__})") from e


def _summarize(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = "__".join(str(x) for x in err["loc"]).upper()
        parts.append(f"CW_{loc}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)
