"""One root exception, grouped by layer, so callers can catch exactly what they can handle.

A `DecodeError` carries the reason code that ends up in the dead-letter `error.reason` header.
"""

from __future__ import annotations

#: Exit codes of the CLI, the only place an error becomes one (library code raises).
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
#: the cluster refuses us (credentials, TLS trust, security protocol, a missing ACL): fix, then restart
EXIT_ACCESS = 4
#: `replay` stopped by SIGTERM/SIGINT before the end of its window (128 + SIGINT, as a shell says)
EXIT_INTERRUPTED = 130


class WorkerError(Exception):
    """Root of every error classify-worker raises on purpose."""


class ConfigError(WorkerError):
    """Settings are invalid; the CLI prints one line and exits 2."""


class ModelError(WorkerError):
    """A model bundle is missing, corrupt, or inconsistent with its labels."""


class InferenceError(ModelError):
    """The classifier failed on a whole batch (not on one bad message): retry, do not commit."""


class DecodeError(WorkerError):
    """One inbound message cannot be classified; it goes to the dead-letter topic."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DeliveryError(WorkerError):
    """Outputs could not be delivered or offsets not committed; the batch is retried."""


class FatalDeliveryError(DeliveryError):
    """The producer is fenced or fatally broken: exit non-zero so the orchestrator restarts us."""


class WedgedClientError(FatalDeliveryError):
    """A librdkafka call outlived its own timeout and is still blocked: the client cannot be
    used (or even closed) safely any more."""


class DataError(WorkerError):
    """A training or evaluation data file cannot be read."""


class KafkaAccessError(WorkerError):
    """The Kafka cluster refuses this worker: authentication, TLS trust, security protocol or a
    missing ACL (worker/kafka_errors.py names which). Retrying the same request cannot succeed,
    so the CLI exits 4; nothing of the batch in hand was committed, so a restart once the cause
    is fixed loses nothing."""
