"""How many messages the next micro-batch may take: a batch bounded by estimated classifier time,
not only by a count. One burst of 256 queries is ~250 ms of model time on two cores; taken as
one batch, it puts that whole call in front of every message behind it, and its first messages
wait for its last. Bounded by time, the burst goes through in short calls that are produced and
committed one after the other, and the bound grows only while a backlog lasts (full batches one
after another), so a drain still reaches the large, efficient batches."""

from __future__ import annotations


class BatchSizer:
    """About `target_s` of classifier time per batch at the measured cost per message (an
    exponentially weighted mean of the seconds per message of calls of `MIN_MEASURED` or more),
    doubling while batches come out full, up to `max_items`; back to the target once one does
    not. `target_s` 0: the count cap alone."""

    #: Weight of the newest call in the mean: a few calls follow a change of traffic (queries to
    #: documents), one slow call (a core taken away) moves it little.
    SMOOTHING = 0.2
    #: Calls smaller than this are not measured: a call's fixed cost (a few ms) dominates a
    #: handful of messages, and their mean would cap a backlog's batches at a handful too.
    MIN_MEASURED = 16

    def __init__(self, target_s: float, max_items: int) -> None:
        self._target_s = target_s
        self._max_items = max_items
        self._per_item_s: float | None = None
        self._scale = 1

    def limit(self) -> int:
        """The most messages the next batch may take."""
        if self._target_s <= 0 or self._per_item_s is None:
            return self._max_items
        fit = self._target_s * self._scale / self._per_item_s  # may overflow int: compare as float
        return max(1, int(min(float(self._max_items), fit)))

    def taken(self, items: int, limit: int) -> None:
        """A batch of `items` was taken under `limit`: full means more was waiting."""
        if items >= limit and limit < self._max_items:
            self._scale *= 2
        elif items < limit:
            self._scale = 1

    def classified(self, items: int, seconds: float) -> None:
        """A classifier call of `items` messages took `seconds`."""
        if items < self.MIN_MEASURED or seconds <= 0:
            return
        per_item = seconds / items
        if self._per_item_s is None:
            self._per_item_s = per_item
        else:
            self._per_item_s += self.SMOOTHING * (per_item - self._per_item_s)
