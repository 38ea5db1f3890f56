"""Per-partition usage state: the fold over the finished-response partition, in offset
order, each completion id counted once.

The responses topic is keyed by completion id and compacted, so it is its own dedup store:
after an assignment the state is rebuilt by folding the partition from the beginning to
its end (``read_to_end``: fetch high watermark), then live records continue the same fold.
A response seen again (a redelivery after a crash, a replay, an identical re-emission) is
never counted twice; none is lost because nothing is counted that is not in the topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from processor.core import combine, contribution, zero
from processor.core._usage import MINUTE_MS, event_time_ms
from topics import ChatCompletion, UsageKey, UsageTotals

__all__ = ["PartitionUsage"]


@dataclass
class PartitionUsage:
    """The usage fold of one responses partition."""

    partition: int
    late_grace_ms: int
    buckets: dict[UsageKey, UsageTotals] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)
    changed: set[UsageKey] = field(default_factory=set)
    stream_time_ms: int = 0
    """The latest event time seen on this partition: lateness is judged against it."""
    next_offset: int = 0
    invalid: int = 0
    late: int = 0

    def apply(self, offset: int, key: bytes | None, value: bytes | None) -> ChatCompletion | None:
        """Fold one record (in offset order); the response if it was counted now."""
        if offset < self.next_offset:
            return None  # already folded (rebuilt from the topic, then redelivered)
        self.next_offset = offset + 1
        if value is None or key is None:
            return None  # a tombstone: nothing to count
        cid = key.decode("utf-8", "replace")
        if cid in self.counted:
            return None
        try:
            response = ChatCompletion.model_validate_json(value)
        except ValidationError:
            self.invalid += 1
            return None
        self.counted.add(cid)
        event = event_time_ms(response)
        window_end = event // MINUTE_MS * MINUTE_MS + MINUTE_MS
        late = window_end + self.late_grace_ms < self.stream_time_ms
        self.stream_time_ms = max(self.stream_time_ms, event)
        bucket, totals = contribution(response, late=late)
        if late:
            self.late += 1
        self.buckets[bucket] = combine(self.buckets.get(bucket, zero()), totals)
        self.changed.add(bucket)
        return response
