"""Usage rollup records: absolute totals per time window and dimensions.

Published to the compacted rollup topic keyed by :meth:`UsageKey.record_key`, so any
store can upsert them and re-publishing an update is harmless. Every measure is an
integer (cost in nano-USD, durations in ms), so combining totals is exact and does not
depend on order.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

__all__ = [
    "LATENCY_BUCKETS_MS",
    "OTHER",
    "UNKNOWN",
    "UsageCheckpoint",
    "UsageKey",
    "UsageRollup",
    "UsageTotals",
    "dimension_value",
]

OTHER = "other"
"""The value a dimension gets beyond its cardinality cap."""
UNKNOWN = "unknown"
"""The value of a dimension the completion did not have."""


def _esc(value: str) -> str:
    return value.replace("%", "%25").replace("|", "%7C")


LATENCY_BUCKETS_MS: tuple[int, ...] = (
    10,
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
)
"""Upper bounds of the latency histogram buckets; one more bucket holds everything above."""


class UsageKey(BaseModel):
    """One bucket: a tumbling window and the dimensions."""

    model_config = ConfigDict(frozen=True)

    window_start_ms: int
    window_ms: int
    tenant: str
    model: str
    provider: str
    status: str
    late: bool = False
    """Counted after the window's late-data grace had passed (kept apart, never dropped)."""
    user: str = UNKNOWN
    """The end user (``cs-user``); ``other`` beyond the cap (absent in older records)."""
    attributes: tuple[tuple[str, str], ...] = ()
    """The allowlisted ``cs-attr-*`` attributes, sorted by name (on the wire: an object);
    a missing one is absent (it reads as ``unknown``), ``other`` beyond the cap."""

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes_in(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(k), str(v)) for k, v in value.items()))
        if isinstance(value, list | tuple):
            return tuple(sorted(tuple(pair) for pair in value))
        return value

    @field_serializer("attributes")
    def _attributes_out(self, value: tuple[tuple[str, str], ...]) -> dict[str, str]:
        return dict(value)

    def record_key(
        self, source_partition: int | None = None, source_offset: int | None = None
    ) -> str:
        """``window_start|window_ms|tenant|model|provider|status|late[|u=user][|a.name=value
        ...][|partition[|offset]]``.

        A late increment (a completion counted after its window closed) carries the
        source offset of that completion: its own key, never overwriting the window's
        final total nor another late increment. The user and attribute segments are
        there only when the bucket has them, so a bucket without them keeps the key it
        always had; their values are escaped (``%`` and ``|``) and prefixed (``u=``,
        ``a.<name>=``), so they cannot be mistaken for each other or for the partition."""
        parts = [
            str(self.window_start_ms),
            str(self.window_ms),
            self.tenant,
            self.model,
            self.provider,
            self.status,
            "late" if self.late else "on-time",
        ]
        if self.user != UNKNOWN:
            parts.append("u=" + _esc(self.user))
        parts += [f"a.{name}={_esc(value)}" for name, value in self.attributes]
        if source_partition is not None:
            parts.append(str(source_partition))
            if source_offset is not None:
                parts.append(str(source_offset))
        return "|".join(parts)


class UsageTotals(BaseModel):
    """Additive measures of one bucket (all integers: exact and order-independent)."""

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    complete: int = 0
    incomplete: int = 0
    error: int = 0
    without_usage: int = 0
    """Completions whose provider reported no usage: never guessed into the token sums."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano_usd: int = 0
    """Cost the provider reported (``cost_reported``)."""
    with_cost: int = 0
    cost_estimated_nano_usd: int = 0
    """Cost estimated from the price database where the provider reported none, kept
    apart from the reported cost (``cost_estimated``)."""
    with_cost_estimated: int = 0
    ttfc_ms_buckets: tuple[int, ...] = Field(default=(0,) * (len(LATENCY_BUCKETS_MS) + 1))
    duration_ms_buckets: tuple[int, ...] = Field(default=(0,) * (len(LATENCY_BUCKETS_MS) + 1))
    rate_tokens: int = 0
    """Completion tokens of completions with a known duration (for tokens per second)."""
    rate_duration_ms: int = 0


class UsageRollup(BaseModel):
    """The record on the rollup topic: a bucket's key, its totals and derived figures."""

    key: UsageKey
    source_partition: int | None = None
    source_offset: int | None = None
    """Set on a late increment: the offset of the one completion it counts."""
    as_of_offset: int | None = None
    """The source partition's ``next_offset`` when this total was taken: a reader (or
    store) keeps, per key, the record with the highest one, so a total written from an
    older state (a worker that lost the partition) never replaces a newer one."""
    final: bool = False
    """The window has closed on its source partition: these totals never change again
    (late data beyond the grace arrives as separate increments)."""
    totals: UsageTotals
    ttfc_ms_p50: int | None = None
    ttfc_ms_p95: int | None = None
    ttfc_ms_p99: int | None = None
    duration_ms_p50: int | None = None
    duration_ms_p95: int | None = None
    duration_ms_p99: int | None = None
    output_tokens_per_s: float | None = None
    cost_usd: float = 0.0
    """Reported by the providers."""
    cost_estimated_usd: float = 0.0
    """Estimated where the providers reported none (see ``totals.with_cost_estimated``)."""


class UsageCheckpoint(BaseModel):
    """The usage fold of one responses partition, and the source offset it reflects.

    Written to the checkpoint topic (compacted, key = partition) after every rollup it
    accounts for is acknowledged. Recovery loads it, re-reads the responses in
    ``[dedup_from_offset, next_offset)`` for their ids only (the dedup horizon, bounded in
    time) and folds the responses from ``next_offset`` on.
    """

    version: int = 1
    source_topic: str
    source_partition: int
    next_offset: int
    """The first responses offset NOT reflected in this state."""
    stream_time_ms: int
    dedup_from_offset: int
    dedup_latest_ts_ms: int = 0
    buckets: list[tuple[UsageKey, tuple[int | tuple[int, ...], ...]]] = Field(default_factory=list)
    """Open buckets: key and the totals' values in ``UsageTotals.model_fields`` order."""
    counted: int = 0
    invalid: int = 0
    late: int = 0
    capped: dict[str, int] = Field(default_factory=dict)
    """Completions counted as ``other`` per dimension (``user``, ``attr.<name>``)."""


def dimension_value(key: UsageKey, dimension: str) -> str:
    """A bucket's value of one dimension: tenant, model, provider, status, user or
    ``attr.<name>`` (``unknown`` when the bucket has no such attribute)."""
    if dimension.startswith("attr."):
        return dict(key.attributes).get(dimension[5:], UNKNOWN)
    value: str = getattr(key, dimension)
    return value
