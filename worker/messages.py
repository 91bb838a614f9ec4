"""The message contracts: what producers write, what routed consumers read, what the DLQ carries.

`schemas/*.schema.json` are generated from these models (`python -m worker.messages`); a test
fails when they drift, so the published contract and the code cannot disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

#: Header names are part of the contract: consumers filter on them without parsing values.
ROUTE_HEADERS = ("route.category", "route.label", "route.score", "route.model")
#: On every output (routed and dead-letter): "<instance>:<nonce>:<seq>", the transaction attempt
#: that produced it — lineage for operators tracing an output back to a worker process.
BATCH_HEADER = "route.batch"
ERROR_REASON = "error.reason"
ERROR_MESSAGE = "error.message"
SOURCE_TOPIC = "source.topic"
SOURCE_PARTITION = "source.partition"
SOURCE_OFFSET = "source.offset"
#: On a dead letter too large to keep its body (null value): the original value's size and
#: SHA-256 (hex), so the message can be found and matched at its producer.
VALUE_BYTES = "error.value_bytes"
VALUE_SHA256 = "error.value_sha256"
#: How many times `classify-worker replay` has re-driven this message from the DLQ; replay skips
#: it at `--max-replays`, so a message that fails every time cannot loop.
REPLAY_COUNT = "replay.count"


class Inbound(BaseModel):
    """One query or document to classify; unknown fields are kept and passed through."""

    model_config = ConfigDict(extra="allow", title="Inbound")

    id: str | None = Field(default=None, min_length=1, description="Defaults to 'topic:partition:offset'.")
    text: str = Field(description="The text to classify; must not be blank.")
    kind: Literal["query", "document"] = "query"
    meta: dict[str, Any] | None = None


class ScoredLabel(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    score: float


class Truncated(BaseModel):
    """How much of a text longer than the worker reads (`CW_LIMITS__MAX_CHUNKS`) its route rests on."""

    model_config = ConfigDict(frozen=True)

    chunks: int = Field(ge=1, description="Model windows classified: the text's first CW_LIMITS__MAX_CHUNKS.")
    chars: int = Field(
        ge=0, description="Characters (Unicode code points) of `text` those chunks cover; the rest was not read."
    )


class Route(BaseModel):
    model_config = ConfigDict(frozen=True)

    category: str = Field(description="Category of the top label, also when the item fell back.")
    category_score: float = Field(
        ge=0.0,
        le=1.0,
        description="Summed probability of the labels in `category`: what the threshold is compared with.",
    )
    label: str
    score: float = Field(ge=0.0, le=1.0, description="Probability of the top label.")
    top_k: list[ScoredLabel]
    model: str = Field(description="Model name and content-hash version, e.g. 'clinc150-minilm@3f2a…'.")
    fallback: bool
    reason: Literal["low_confidence", "fallback_label", "out_of_distribution"] | None = None
    distance: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "Only with a bundle that has a Mahalanobis fit: distance of the text's pooled embedding to the "
            "nearest in-scope label; over routes.json's max_distance it falls back as out_of_distribution."
        ),
    )
    truncated: Truncated | None = Field(
        default=None,
        description="Only on a text longer than CW_LIMITS__MAX_CHUNKS chunks: it was routed on its beginning.",
    )


class Routed(Inbound):
    """What `routed.<category>` and the fallback topic carry: the inbound object plus `route`."""

    model_config = ConfigDict(extra="allow", title="Routed")

    id: str = Field(min_length=1)
    route: Route


#: `inference_error`: the classifier raised on this record alone (its batch was bisected to find it);
#: `too_long`: over CW_LIMITS__MAX_CHUNKS chunks, with CW_LIMITS__OVER_MAX_CHUNKS=dead_letter.
DeadLetterReason = Literal[
    "null_value",
    "too_large",
    "encoding",
    "invalid_json",
    "not_an_object",
    "schema",
    "empty_text",
    "inference_error",
    "too_long",
]


class DeadLetterHeaders(BaseModel):
    """Headers added to a dead-lettered message; its value, key and own headers are unchanged."""

    model_config = ConfigDict(title="DeadLetterHeaders", populate_by_name=True)

    reason: DeadLetterReason = Field(alias="error.reason")
    message: str = Field(alias="error.message")
    topic: str = Field(alias="source.topic")
    partition: int = Field(alias="source.partition")
    offset: int = Field(alias="source.offset")


#: The route of an item sent to the fallback topic, in shadow records and metrics: a route is
#: where the item goes (its category topic, or fallback), which is what a consumer would notice.
FALLBACK_ROUTE = "fallback"


class ShadowVerdict(BaseModel):
    """What one model decided for an item."""

    model_config = ConfigDict(frozen=True)

    model: str
    route: str = Field(description="The category whose topic the item goes to, or 'fallback'.")
    label: str
    score: float = Field(ge=0.0, le=1.0, description="Probability of the top label.")
    category_score: float = Field(ge=0.0, le=1.0, description="What the fallback threshold is compared with.")


class ShadowDisagreement(BaseModel):
    """One item the shadow model would have routed elsewhere; keyed like the input."""

    model_config = ConfigDict(frozen=True, title="ShadowDisagreement")

    type: Literal["disagreement"] = "disagreement"
    id: str
    primary: ShadowVerdict
    shadow: ShadowVerdict


class ShadowTally(BaseModel):
    """One per batch: how many items both models scored, by primary route → shadow route.

    Written in the batch's transaction with its disagreements, so totals read from the topic are
    exact without a record per agreeing item."""

    model_config = ConfigDict(frozen=True, title="ShadowTally")

    type: Literal["tally"] = "tally"
    primary_model: str
    shadow_model: str
    items: int = Field(ge=0, description="Items scored by both models.")
    unscored: int = Field(default=0, ge=0, description="Items the shadow model failed on (routing unaffected).")
    routes: dict[str, dict[str, int]] = Field(description="Primary route → shadow route → items; diagonal = agreed.")


class ShadowRecord(RootModel[Annotated[ShadowDisagreement | ShadowTally, Field(discriminator="type")]]):
    """What the shadow topic carries: disagreements and per-batch tallies."""

    model_config = ConfigDict(title="ShadowRecord")


SCHEMAS: dict[str, type[BaseModel]] = {
    "inbound": Inbound,
    "routed": Routed,
    "dead-letter-headers": DeadLetterHeaders,
    "shadow": ShadowRecord,
}


def schema_documents() -> dict[str, str]:
    """File name → JSON text, as committed under `schemas/`."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"
        for name, model in SCHEMAS.items()
    }


def write_schemas(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in schema_documents().items():
        (directory / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
