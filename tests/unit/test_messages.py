from __future__ import annotations

from pathlib import Path

from worker.messages import Inbound, Routed, schema_documents

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_models() -> None:
    for name, text in schema_documents().items():
        path = SCHEMAS / name
        assert path.exists(), f"schemas/{name} missing: run `python -m worker.messages`"
        assert path.read_text() == text, (
            f"schemas/{name} drifted from worker/messages.py: run `python -m worker.messages`"
        )
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(schema_documents())


def test_inbound_keeps_unknown_fields() -> None:
    m = Inbound.model_validate({"text": "hi", "tenant": "acme"})
    assert m.model_dump()["tenant"] == "acme"
    assert m.kind == "query"


def test_routed_requires_id_and_route() -> None:
    assert "route" in Routed.model_json_schema()["required"]
    assert "id" in Routed.model_json_schema()["required"]
