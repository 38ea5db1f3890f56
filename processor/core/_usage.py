"""Usage aggregation as a fold: ``contribution`` -> ``combine`` (with ``zero``) -> ``result``.

Pure: a finished response in, integers out. ``combine`` is associative and commutative
and ``zero`` is its identity (property-tested), so totals can be built in any order, on
any number of workers, and re-combined into coarser windows (1 min -> 1 h -> 1 d).
"""

from __future__ import annotations

import bisect
from typing import Any

from topics._response import ChatCompletion
from topics._usage import LATENCY_BUCKETS_MS, UNKNOWN, UsageKey, UsageRollup, UsageTotals

__all__ = [
    "MINUTE_MS",
    "WINDOWS_MS",
    "combine",
    "contribution",
    "event_time_ms",
    "labels",
    "percentile",
    "percentiles",
    "result",
    "roll_up",
    "zero",
]

MINUTE_MS = 60_000
WINDOWS_MS = {"1m": MINUTE_MS, "1h": 60 * MINUTE_MS, "1d": 24 * 60 * MINUTE_MS}
_ZERO = UsageTotals()


def zero() -> UsageTotals:
    """The identity of :func:`combine`."""
    return _ZERO


def _bucket(value_ms: int) -> tuple[int, ...]:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    counts[bisect.bisect_left(LATENCY_BUCKETS_MS, value_ms)] = 1
    return tuple(counts)


def combine(a: UsageTotals, b: UsageTotals) -> UsageTotals:
    """Both buckets' totals added up (exact: every measure is an integer)."""
    if a is _ZERO:
        return b
    if b is _ZERO:
        return a
    values: dict[str, Any] = {}
    for name in UsageTotals.model_fields:
        x, y = getattr(a, name), getattr(b, name)
        values[name] = (
            tuple(i + j for i, j in zip(x, y, strict=True)) if isinstance(x, tuple) else x + y
        )
    return UsageTotals(**values)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def event_time_ms(response: ChatCompletion) -> int:
    """When the completion happened: the request start, else its first chunk, else
    ``created`` (never the clock of whoever aggregates)."""
    meta = response.chunkstitch
    if meta.request_started_at_ms is not None:
        return meta.request_started_at_ms
    if meta.first_chunk_at_ms is not None:
        return meta.first_chunk_at_ms
    return response.created * 1000


def labels(response: ChatCompletion) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The user and the attributes (sorted, empty values left out) a response carries."""
    meta = response.chunkstitch
    attrs = meta.attributes
    return (
        meta.user or UNKNOWN,
        tuple(sorted((k, v) for k, v in attrs.items() if v)) if attrs else (),
    )


def contribution(
    response: ChatCompletion,
    *,
    window_ms: int = MINUTE_MS,
    late: bool = False,
    dims: tuple[str, tuple[tuple[str, str], ...]] | None = None,
) -> tuple[UsageKey, UsageTotals]:
    """The bucket a finished response falls into, and what it adds there. ``dims`` (user,
    attributes) replaces the response's own :func:`labels` (the fold's cardinality cap)."""
    meta = response.chunkstitch
    start = event_time_ms(response) // window_ms * window_ms
    user, attributes = labels(response) if dims is None else dims
    key = UsageKey(
        window_start_ms=start,
        window_ms=window_ms,
        tenant=meta.tenant or UNKNOWN,
        model=response.model or UNKNOWN,
        provider=meta.provider or response.provider or UNKNOWN,
        status=meta.status,
        late=late,
        user=user,
        attributes=attributes,
    )
    values: dict[str, Any] = {"requests": 1, meta.status: 1}
    usage = response.usage
    if usage is None or not meta.usage_reported:
        values["without_usage"] = 1
    else:
        extra = usage.model_dump()
        values.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_prompt_tokens=_int((usage.prompt_tokens_details or {}).get("cached_tokens")),
            reasoning_tokens=_int((usage.completion_tokens_details or {}).get("reasoning_tokens")),
        )
        cost = extra.get("cost")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            values["cost_nano_usd"] = round(cost * 1e9)
            values["with_cost"] = 1
        elif meta.cost_estimated is not None:  # estimated by the worker, never mixed in
            values["cost_estimated_nano_usd"] = round(meta.cost_estimated * 1e9)
            values["with_cost_estimated"] = 1
    if meta.time_to_first_chunk_ms is not None:
        values["ttfc_ms_buckets"] = _bucket(meta.time_to_first_chunk_ms)
    if meta.duration_ms is not None:
        values["duration_ms_buckets"] = _bucket(meta.duration_ms)
        if usage is not None and meta.usage_reported and meta.duration_ms > 0:
            values["rate_tokens"] = usage.completion_tokens
            values["rate_duration_ms"] = meta.duration_ms
    return key, UsageTotals(**values)


def roll_up(key: UsageKey, window_ms: int) -> UsageKey:
    """The same bucket in a coarser window (1 min -> 1 h -> 1 d)."""
    if window_ms % key.window_ms:
        raise ValueError(f"cannot roll a {key.window_ms} ms window up into {window_ms} ms")
    return key.model_copy(
        update={
            "window_start_ms": key.window_start_ms // window_ms * window_ms,
            "window_ms": window_ms,
        }
    )


def percentiles(
    buckets: tuple[int, ...] | list[int], qs: tuple[float, ...]
) -> tuple[int | None, ...]:
    """For each quantile of ``qs`` (ascending), the upper bound (ms) of the histogram bucket
    holding it, in one walk of the histogram (None if empty; values above the last bound
    report that bound)."""
    total = sum(buckets)
    if total == 0:
        return (None,) * len(qs)
    last = len(LATENCY_BUCKETS_MS) - 1
    out: list[int | None] = []
    ranks = [q * total for q in qs]
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        while ranks and seen >= ranks[0]:
            out.append(LATENCY_BUCKETS_MS[min(i, last)])
            ranks.pop(0)
        if not ranks:
            break
    out.extend(LATENCY_BUCKETS_MS[-1] for _ in ranks)
    return tuple(out)


def percentile(buckets: tuple[int, ...], q: float) -> int | None:
    """:func:`percentiles` of one quantile."""
    return percentiles(buckets, (q,))[0]


def result(key: UsageKey, totals: UsageTotals, source_partition: int | None = None) -> UsageRollup:
    """The published record: totals plus what operators read off them."""
    t = totals
    return UsageRollup(
        key=key,
        source_partition=source_partition,
        totals=t,
        ttfc_ms_p50=percentile(t.ttfc_ms_buckets, 0.5),
        ttfc_ms_p95=percentile(t.ttfc_ms_buckets, 0.95),
        ttfc_ms_p99=percentile(t.ttfc_ms_buckets, 0.99),
        duration_ms_p50=percentile(t.duration_ms_buckets, 0.5),
        duration_ms_p95=percentile(t.duration_ms_buckets, 0.95),
        duration_ms_p99=percentile(t.duration_ms_buckets, 0.99),
        output_tokens_per_s=(
            t.rate_tokens * 1000 / t.rate_duration_ms if t.rate_duration_ms else None
        ),
        cost_usd=t.cost_nano_usd / 1e9,
        cost_estimated_usd=t.cost_estimated_nano_usd / 1e9,
    )
