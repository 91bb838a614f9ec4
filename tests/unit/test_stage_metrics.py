"""Per-stage latency: the worker's `classify_stage_seconds` counts every message once per stage,
and `make bench` reads percentiles off it (less a warm-up scrape) the way PromQL's
histogram_quantile does."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from devkit.bench import stage_quantiles
from worker.observability import STAGES, PrometheusHooks


def _text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_a_batch_span_counts_once_per_message_and_waits_once_each() -> None:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    # a batch of 4 messages: each its own wait, the batch's spans shared
    hooks.on_stages([0.004, 0.004, 0.004, 0.2], {"classify": 0.012, "commit": 0.03}, 4)
    counts = {
        s.labels["stage"]: s.value
        for s in hooks.stage.collect()[0].samples
        if s.name.endswith("_count") and s.labels["stage"] in STAGES
    }
    assert counts["wait"] == 4 and counts["classify"] == 4 and counts["commit"] == 4, counts
    assert counts["produce"] == 0, "a stage not reported was counted"


def test_quantiles_interpolate_inside_the_bucket_and_skip_the_warm_up() -> None:
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    hooks.on_stages([1.0] * 100, {}, 100)  # the warm-up: slow
    warm = _text(registry)
    # then 100 messages: 98 waited 1-2 ms, 2 waited 150-200 ms
    hooks.on_stages([0.0015] * 98 + [0.18, 0.18], {}, 100)
    figures = stage_quantiles(_text(registry), since=warm)["wait"]
    # p50 lies in the (1 ms, 2 ms] bucket; p99 in (150 ms, 200 ms]; the warm-up's 1 s is gone
    assert 1.0 < figures["p50_ms"] <= 2.0, figures
    assert 150.0 < figures["p99_ms"] <= 200.0, figures
    alone = stage_quantiles(warm)["wait"]["p50_ms"]
    assert 750.0 < alone <= 1000.0, f"the warm-up alone reads {alone} ms, not its (750 ms, 1 s] bucket"
