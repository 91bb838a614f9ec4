"""Our own record types, so the pipeline and its tests never touch `confluent_kafka.Message`
(which Python code cannot construct) or a Faust event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Headers = list[tuple[str, bytes | None]]
#: `shadow`: a shadow model's disagreement or batch tally, produced beside the item's own output.
OutcomeKind = Literal["routed", "fallback", "dead_letter", "shadow"]


@dataclass(frozen=True, slots=True)
class Record:
    """One inbound message as the engine polled it."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    topic: str = ""
    partition: int = 0
    offset: int = 0
    #: Broker or producer timestamp (ms since epoch), for end-to-end latency.
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to produce: exactly one per inbound record, plus any shadow records."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    kind: OutcomeKind
    source: Record
    #: The routed category, the dead-letter reason code, or the shadow record's type.
    detail: str
