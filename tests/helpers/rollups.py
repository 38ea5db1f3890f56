"""A reference reader for tests: the 1-minute rollup topic summed over source partitions,
filtered and grouped, straight from the records (no read model, no retention window).

The tests of the PostgreSQL history compare the database's answers with it. Per key the
record with the highest ``as_of_offset`` wins (a stale writer never replaces a newer
total), as the read model and the sink do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from processor.core import WINDOWS_MS, combine, result, roll_up, zero
from processor.kafka import read_to_end
from processor.settings import Settings
from topics import UsageKey, UsageRollup, UsageTotals

__all__ = ["DIMENSIONS", "aggregate", "read_rollups"]

DIMENSIONS = ("tenant", "model", "provider", "status")


async def read_rollups(settings: Settings) -> list[UsageRollup]:
    """The latest rollup record of every key on the rollup topic."""
    from aiokafka import TopicPartition

    tps = [TopicPartition(settings.topic_rollups, p) for p in range(settings.partitions)]
    latest: dict[bytes, UsageRollup] = {}
    for rec in await read_to_end(settings, tps):
        if rec.key is None or rec.value is None:
            continue
        try:
            rollup = UsageRollup.model_validate_json(rec.value)
        except ValidationError:
            continue
        known = latest.get(rec.key)
        if known is None or (rollup.as_of_offset or 0) >= (known.as_of_offset or 0):
            latest[rec.key] = rollup
    return list(latest.values())


def aggregate(
    rollups: Iterable[UsageRollup],
    *,
    window: str = "1m",
    by: Sequence[str] = DIMENSIONS,
    since_ms: int | None = None,
    until_ms: int | None = None,
    filters: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Sum rollups (over source partitions) into ``window`` buckets grouped ``by``."""
    if window not in WINDOWS_MS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS_MS)}, got {window!r}")
    unknown = set(by) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"cannot group by {sorted(unknown)}; choose from {', '.join(DIMENSIONS)}")
    size = WINDOWS_MS[window]
    groups: dict[UsageKey, UsageTotals] = {}
    for rollup in rollups:
        key = rollup.key
        if filters and any(getattr(key, k) != v for k, v in filters.items() if v):
            continue
        if since_ms is not None and key.window_start_ms + key.window_ms <= since_ms:
            continue
        if until_ms is not None and key.window_start_ms >= until_ms:
            continue
        coarse = roll_up(key, size).model_copy(update={d: "*" for d in DIMENSIONS if d not in by})
        groups[coarse] = combine(groups.get(coarse, zero()), rollup.totals)
    out = []
    for key in sorted(
        groups, key=lambda k: (k.window_start_ms, *(getattr(k, d) for d in DIMENSIONS), k.late)
    ):
        out.append(
            result(key, groups[key]).model_dump(
                exclude={"source_partition", "source_offset", "final"}
            )
        )
    return out
