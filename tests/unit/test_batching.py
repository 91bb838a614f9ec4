"""Batches bounded by estimated classifier time: short calls at light load and after a burst,
the full count cap while a backlog lasts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.batching import BatchSizer


def test_before_any_measurement_only_the_count_caps_a_batch() -> None:
    assert BatchSizer(0.025, 256).limit() == 256


def test_a_batch_takes_about_the_target_time_at_the_measured_cost() -> None:
    sizer = BatchSizer(0.025, 256)
    sizer.classified(100, 0.2)  # 2 ms per message
    assert sizer.limit() == 12  # 25 ms / 2 ms


def test_full_batches_double_the_bound_up_to_the_count_cap_and_one_short_batch_resets_it() -> None:
    sizer = BatchSizer(0.025, 256)
    sizer.classified(100, 0.2)
    limits = []
    for _ in range(6):  # a backlog: every batch comes out full
        limit = sizer.limit()
        limits.append(limit)
        sizer.taken(limit, limit)
    assert limits == [12, 25, 50, 100, 200, 256], limits
    sizer.taken(3, sizer.limit())  # the backlog is gone
    assert sizer.limit() == 12


def test_small_calls_do_not_set_the_cost_their_fixed_overhead_dominates() -> None:
    sizer = BatchSizer(0.025, 256)
    sizer.classified(2, 0.012)  # 6 ms per message in a call of two: mostly the call's own cost
    assert sizer.limit() == 256
    sizer.classified(64, 0.064)
    assert sizer.limit() == 25


def test_target_zero_leaves_the_count_cap_alone() -> None:
    sizer = BatchSizer(0.0, 64)
    sizer.classified(100, 1.0)
    assert sizer.limit() == 64


@given(
    calls=st.lists(st.tuples(st.integers(0, 500), st.floats(0, 10, allow_nan=False)), max_size=30),
    takes=st.lists(st.integers(0, 600), max_size=30),
)
def test_the_bound_is_always_between_one_and_the_count_cap(calls: list[tuple[int, float]], takes: list[int]) -> None:
    sizer = BatchSizer(0.025, 256)
    for (items, seconds), taken in zip(calls, takes, strict=False):
        sizer.classified(items, seconds)
        sizer.taken(taken, sizer.limit())
        assert 1 <= sizer.limit() <= 256
