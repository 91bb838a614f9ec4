from __future__ import annotations

from devkit.toolkit import paced
from devkit.traffic import messages


def test_paced_stops_at_count_or_when_told() -> None:
    assert list(paced(None, count=5)) == [0, 1, 2, 3, 4]
    stop_after = iter([False, False, True])
    assert list(paced(None, count=100, should_stop=lambda: next(stop_after))) == [0, 1]
    assert list(paced(None, duration_s=0.0)) == []


def test_demo_traffic_is_fixed_and_covers_every_domain_and_the_dlq() -> None:
    first, second = messages(), messages()
    assert first == second, "the demo must be the same every run"
    expected = {m.expected for m in first}
    assert len({e for e in expected if not e.startswith("dlq:")}) == 11  # 10 domains + fallback
    assert {e for e in expected if e.startswith("dlq:")} >= {"dlq:invalid_json", "dlq:schema", "dlq:null_value"}
