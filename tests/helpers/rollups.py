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

__all__ = ["DIMENSIONS", "aggregate", "read_rollups", "rollup"]

DIMENSIONS = ("tenant", "model", "provider", "status")
MIN = WINDOWS_MS["1m"]


def rollup(
    start: int,
    requests: int,
    *,
    tenant: str = "acme",
    size: int = MIN,
    partition: int = 0,
    late: bool = False,
    offset: int | None = None,
) -> tuple[str, UsageRollup]:
    """A rollup record (its record key and value) of ``requests`` complete requests."""
    key = UsageKey(
        window_start_ms=start,
        window_ms=size,
        tenant=tenant,
        model="m",
        provider="p",
        status="complete",
        late=late,
    )
    r = result(key, UsageTotals(requests=requests, complete=requests), partition)
    r = r.model_copy(update={"source_offset": offset})
    return key.record_key(partition, offset), r


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


def _value(key: UsageKey, dim: str) -> str:
    if dim.startswith("attr."):
        return dict(key.attributes).get(dim[5:], "unknown")
    value: str = getattr(key, dim)
    return value


def aggregate(
    rollups: Iterable[UsageRollup],
    *,
    window: str = "1m",
    by: Sequence[str] = DIMENSIONS,
    since_ms: int | None = None,
    until_ms: int | None = None,
    filters: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Sum rollups (over source partitions) into ``window`` buckets grouped ``by``
    (tenant, model, provider, status, user, ``attr.<name>``)."""
    if window not in WINDOWS_MS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS_MS)}, got {window!r}")
    classic = (*DIMENSIONS, "user")
    unknown = {d for d in by if not d.startswith("attr.")} - set(classic)
    if unknown:
        raise ValueError(f"cannot group by {sorted(unknown)}; choose from {', '.join(classic)}")
    attrs = sorted(d[5:] for d in set(by) if d.startswith("attr."))
    size = WINDOWS_MS[window]
    groups: dict[UsageKey, UsageTotals] = {}
    for rollup in rollups:
        key = rollup.key
        if filters and any(_value(key, k) != v for k, v in filters.items() if v):
            continue
        if since_ms is not None and key.window_start_ms + key.window_ms <= since_ms:
            continue
        if until_ms is not None and key.window_start_ms >= until_ms:
            continue
        update: dict[str, Any] = {d: "*" for d in classic if d not in by}
        update["attributes"] = tuple((a, _value(key, "attr." + a)) for a in attrs)
        coarse = roll_up(key, size).model_copy(update=update)
        groups[coarse] = combine(groups.get(coarse, zero()), rollup.totals)
    out = []
    for key in sorted(
        groups,
        key=lambda k: (
            k.window_start_ms,
            *(getattr(k, d) for d in classic),
            *(v for _, v in k.attributes),
            k.late,
        ),
    ):
        out.append(
            result(key, groups[key]).model_dump(
                exclude={"source_partition", "source_offset", "final"}
            )
        )
    return out
