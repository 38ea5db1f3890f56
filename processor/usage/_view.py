"""The live read model of usage: ``GET /usage`` and ``chunkstitch usage`` answer from it.

* **One query model** (:class:`UsageQuery`) validates the parameters of both: ``since``
  and ``until`` as ISO-8601, epoch milliseconds or a relative ``15m`` / ``2h`` / ``7d``
  (before now), ``window`` (1m, 1h, 1d), ``by`` (a comma list of dimensions: tenant,
  model, provider, status, user, ``attr.<name>``), filters (tenant, model, provider,
  status, user, ``attr.<name>=value``), ``limit`` and an opaque ``cursor`` for the next page.
  Anything wrong is a :class:`QueryError` with a one-line message (HTTP 400, CLI exit 2).
* **Maintained incrementally** (:class:`UsageView`) from the two rollup topics: 1-minute
  rows (kept for ``usage_view_minutes_s``) from the 1-minute topic, 1-hour rows and
  1-day rows (summed from the hourly ones) from the hourly topic. A rollup record is an
  absolute total for its key; the view remembers the last total per key for a bounded
  period and adds only the difference, so a re-published total changes nothing and rows
  are already summed over source partitions.
* **A query costs O(rows in its range)**: the windows are kept sorted, a query bisects
  to ``since`` and walks forward until ``until`` or ``limit`` rows; never the history.
* **Off the stitching path**: in the worker, ``processor.usage._serve`` runs the rollup
  consumer, the folding and ``GET /usage`` on an event loop of their own (a child
  process by default); queries take a ``threading.Lock`` for the time of one page.
"""

from __future__ import annotations

import base64
import bisect
import json
import operator
import re
import sys
import threading
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from processor.core import WINDOWS_MS, combine, percentiles, zero
from processor.logs import get_logger
from processor.settings import Settings
from topics import UsageRollup, UsageTotals
from topics._headers import check_attribute_name
from topics._usage import UNKNOWN

__all__ = [
    "ALL_DIMENSIONS",
    "DIMENSIONS",
    "QueryError",
    "UsageQuery",
    "UsageView",
    "load_view",
    "query_rollups",
    "window_label",
]

log = get_logger("chunkstitch.usage")

DIMENSIONS = ("tenant", "model", "provider", "status")
"""The dimensions a query groups by when ``by`` is not given."""
ALL_DIMENSIONS = (*DIMENSIONS, "user")
"""Plus ``attr.<name>`` for each attribute."""
MINUTE_MS = WINDOWS_MS["1m"]
HOUR_MS = WINDOWS_MS["1h"]
DAY_MS = WINDOWS_MS["1d"]
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant datetime can show
_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_FIELDS = tuple(UsageTotals.model_fields)
_HISTOGRAMS = frozenset(
    n for n, f in UsageTotals.model_fields.items() if isinstance(f.default, tuple)
)
_IS_HISTOGRAM = tuple(name in _HISTOGRAMS for name in _FIELDS)
_ALL_FIELDS = operator.attrgetter(*_FIELDS)
_QUANTILES = (0.5, 0.95, 0.99)

RowKey = tuple[str, str, str, str, str, tuple[tuple[str, str], ...], bool]
"""tenant, model, provider, status, user, attributes, late."""


class QueryError(ValueError):
    """A usage query parameter is wrong; the message says which and what to use."""


def window_label(ms: int) -> str:
    """A window start for people: ``YYYY-MM-DD HH:MM`` UTC, or the raw epoch ms when it is
    outside what a calendar can show (never raises: rollups may hold any timestamp)."""
    try:
        if 0 <= ms <= MAX_MS:
            return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        pass
    return f"@{ms}ms"


def _ago_ms(value: Any) -> int | None:
    """A relative time (``15m``, ``3h``, ``7d``) as milliseconds before now, else None."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"(\d+)([smhd])", value.strip())
    return int(match[1]) * _UNITS[match[2]] if match else None


def _parse_time(name: str, value: Any, now_ms: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise QueryError(f"{name}={value!r}: use ISO-8601, epoch milliseconds or e.g. 15m")
    if isinstance(value, int):
        ms = value
    else:
        text = str(value).strip()
        if re.fullmatch(r"-?\d+", text):
            ms = int(text)
        elif (ago := _ago_ms(text)) is not None:
            ms = now_ms - ago
        else:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise QueryError(
                    f"{name}={text!r} is not a time: use ISO-8601 (2026-01-31T12:00Z), "
                    "epoch milliseconds or a duration before now (15m, 2h, 7d)"
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ms = int(parsed.timestamp() * 1000)
    if not 0 <= ms <= MAX_MS:
        raise QueryError(f"{name}={value!r} is out of range: use a time between 1970 and 9999")
    return ms


class UsageQuery(BaseModel):
    """The parameters of a usage query, shared by ``GET /usage`` and ``chunkstitch usage``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Literal["1m", "1h", "1d"] = "1m"
    by: tuple[str, ...] = DIMENSIONS
    since_ms: int | None = None
    until_ms: int | None = None
    tenant: str | None = None
    model: str | None = None
    provider: str | None = None
    status: str | None = None
    user: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()
    """Attribute filters (``attr.<name>=value``), sorted by name."""
    limit: int = Field(default=1000, ge=1)
    cursor: str | None = None

    @field_validator("by", mode="before")
    @classmethod
    def _split_by(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [d.strip() for d in value.split(",") if d.strip()]
        attrs = sorted({d for d in value if isinstance(d, str) and d.startswith("attr.")})
        for name in attrs:
            problem = check_attribute_name(name[5:])
            if problem:
                raise ValueError(f"cannot group by {name!r}: {problem}")
        unknown = sorted(set(value) - set(ALL_DIMENSIONS) - set(attrs))
        if unknown:
            raise ValueError(
                f"cannot group by {unknown}; choose from {', '.join(ALL_DIMENSIONS)}, attr.<name>"
            )
        return (*(d for d in ALL_DIMENSIONS if d in value), *attrs)

    @field_validator("attributes", mode="before")
    @classmethod
    def _check_filters(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            value = list(value.items())
        for name, _ in value:
            problem = check_attribute_name(name)
            if problem:
                raise ValueError(f"cannot filter on attr.{name}: {problem}")
        return tuple(sorted((str(k), str(v)) for k, v in value))

    @property
    def by_attributes(self) -> tuple[str, ...]:
        """The attribute names grouped by (sorted)."""
        return tuple(d[5:] for d in self.by if d.startswith("attr."))

    def filters(self) -> dict[str, str]:
        """dimension -> required value (``attr.<name>`` for attributes)."""
        out = {d: getattr(self, d) for d in ALL_DIMENSIONS if getattr(self, d)}
        out.update({"attr." + k: v for k, v in self.attributes})
        return out

    def cache_key(self, params: Mapping[str, Any]) -> Hashable:
        """This query in a canonical form that does not depend on the time it was parsed:
        the validated model, except that a ``since`` / ``until`` given relative to now in
        ``params`` (the parameters it was parsed from) stays relative (``3h`` and ``180m``
        are the same key; an absolute time is its epoch ms). Two requests with the same
        key ask for the same page of the same view at the same moment."""
        times = []
        for name, value in (("since", self.since_ms), ("until", self.until_ms)):
            ago = _ago_ms(params.get(name, params.get(f"{name}_ms")))
            times.append(("ago", ago) if ago is not None else ("at", value))
        return (self.model_copy(update={"since_ms": None, "until_ms": None}), *times)

    @classmethod
    def parse(
        cls, params: Mapping[str, Any], *, now_ms: int | None = None, limit_max: int = 10_000
    ) -> UsageQuery:
        """Validate raw parameters (query string or CLI options); raise :class:`QueryError`."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        raw = {k: v for k, v in params.items() if v is not None and v != ""}
        attr_filters = {k[5:]: str(v) for k, v in raw.items() if k.startswith("attr.")}
        raw = {k: v for k, v in raw.items() if not k.startswith("attr.")}
        unknown = sorted(set(raw) - {"since", "until", *cls.model_fields})
        if unknown:
            allowed = (
                "since, until, window, by, tenant, model, provider, status, user, "
                "attr.<name>, limit, cursor"
            )
            raise QueryError(f"unknown parameter {', '.join(unknown)}; use {allowed}")
        values: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("since", "until")}
        if attr_filters:
            values["attributes"] = {**dict(values.get("attributes") or ()), **attr_filters}
        values["since_ms"] = _parse_time("since", raw.get("since", raw.get("since_ms")), now)
        values["until_ms"] = _parse_time("until", raw.get("until", raw.get("until_ms")), now)
        try:
            query = cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "query"
            raise QueryError(
                f"{where}={values.get(str(err['loc'][0]) if err['loc'] else '', '')!r}: "
                f"{err['msg'].removeprefix('Value error, ')}"
            ) from None
        if query.limit > limit_max:
            raise QueryError(f"limit={query.limit} is above the maximum {limit_max}")
        if (
            query.since_ms is not None
            and query.until_ms is not None
            and query.since_ms >= query.until_ms
        ):
            raise QueryError("since must be before until")
        if query.cursor is not None:
            _decode_cursor(query.cursor, query.window)
        return query


def _encode_cursor(window: str, start: int, row: tuple[str, ...]) -> str:
    raw = json.dumps([window, start, list(row)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, window: str) -> tuple[int, tuple[str, ...]]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        w, start, row = json.loads(raw)
        if w != window or not isinstance(start, int) or not isinstance(row, list):
            raise ValueError
        return start, tuple(str(x) for x in row)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise QueryError(
            "cursor is not one this query returned: pass next_cursor unchanged, with the "
            "same window"
        ) from None


def _sum_totals(parts: list[UsageTotals]) -> Mapping[str, Any]:
    """The field values of the parts added up (what :func:`~processor.core.combine` over
    them holds), as a mapping: a query only reads them, so no model is built."""
    if len(parts) == 1:
        return parts[0].__dict__
    columns = zip(*map(_ALL_FIELDS, parts), strict=True)
    return {
        name: tuple(sum(c) for c in zip(*column, strict=True)) if histogram else sum(column)
        for name, histogram, column in zip(_FIELDS, _IS_HISTOGRAM, columns, strict=True)
    }


def _row(
    start: int,
    size: int,
    group: tuple[str, ...],
    t: Mapping[str, Any],
    attr_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What ``result(key, totals).model_dump()`` gives (minus the source fields), built
    directly: a page of rows is the only work a query does, so it stays cheap. ``group``
    is (tenant, model, provider, status, user, one value per grouped attribute, late);
    ``t`` the totals' field values."""
    ttfc = percentiles(t["ttfc_ms_buckets"], _QUANTILES)
    duration = percentiles(t["duration_ms_buckets"], _QUANTILES)
    return {
        "key": {
            "window_start_ms": start,
            "window_ms": size,
            "tenant": group[0],
            "model": group[1],
            "provider": group[2],
            "status": group[3],
            "late": group[-1] == "True",
            "user": group[4],
            "attributes": dict(zip(attr_names, group[5:-1], strict=True)),
        },
        "totals": {name: t[name] for name in _FIELDS},
        "ttfc_ms_p50": ttfc[0],
        "ttfc_ms_p95": ttfc[1],
        "ttfc_ms_p99": ttfc[2],
        "duration_ms_p50": duration[0],
        "duration_ms_p95": duration[1],
        "duration_ms_p99": duration[2],
        "output_tokens_per_s": (
            t["rate_tokens"] * 1000 / t["rate_duration_ms"] if t["rate_duration_ms"] else None
        ),
        "cost_usd": t["cost_nano_usd"] / 1e9,
        "cost_estimated_usd": t["cost_estimated_nano_usd"] / 1e9,
    }


def _value(row: RowKey, attrs: Mapping[str, str], dimension: str) -> str:
    if dimension.startswith("attr."):
        return attrs.get(dimension[5:], UNKNOWN)
    return str(row[ALL_DIMENSIONS.index(dimension)])


def _diff(new: UsageTotals, old: UsageTotals) -> UsageTotals:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        x, y = getattr(new, name), getattr(old, name)
        values[name] = (
            tuple(i - j for i, j in zip(x, y, strict=True)) if isinstance(x, tuple) else x - y
        )
    return UsageTotals(**values)


@dataclass
class _Keys:
    """The last total per rollup key of one (resolution, source partition), for a bounded
    period of windows; older windows are below ``watermark``."""

    latest: dict[str, tuple[int, UsageTotals]] = field(default_factory=dict)
    """record key -> (as_of_offset, totals) of the newest state seen."""
    by_window: dict[int, list[str]] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)
    watermark: int | None = None
    max_late_offset: int = -1
    newest: int | None = None
    """The newest window of an on-time record (late increments, which may carry any
    timestamp, never move the horizon)."""


class UsageView:
    """Usage rows per window size, summed over source partitions, updated per record."""

    def __init__(
        self,
        *,
        minute_keep_ms: int = 6 * HOUR_MS,
        hour_keep_ms: int = 400 * DAY_MS,
        key_keep_ms: int | None = None,
    ) -> None:
        self.minute_keep_ms = minute_keep_ms
        self.hour_keep_ms = hour_keep_ms
        self.key_keep_ms = key_keep_ms if key_keep_ms is not None else max(minute_keep_ms, DAY_MS)
        self.lock = threading.Lock()
        self.rows: dict[int, dict[int, dict[RowKey, UsageTotals]]] = {
            MINUTE_MS: {},
            HOUR_MS: {},
            DAY_MS: {},
        }
        self.starts: dict[int, list[int]] = {MINUTE_MS: [], HOUR_MS: [], DAY_MS: []}
        self._keys: dict[tuple[int, int], _Keys] = {}
        self._newest: dict[int, int] = {}
        self.records = 0
        self.ignored = 0
        self.caught_up = False
        self.version = 0
        """Bumped whenever rollups are applied: a page computed at one version is the
        page of any later moment with the same version (``processor.usage._cache``)."""

    # --- maintenance ---------------------------------------------------------------------

    def apply_records(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> None:
        """Fold raw rollup records (key, value); values that do not validate are skipped."""
        parsed: list[tuple[str, UsageRollup]] = []
        for key, value in records:
            if key is None or value is None:
                continue
            try:
                parsed.append(
                    (key.decode("utf-8", "replace"), UsageRollup.model_validate_json(value))
                )
            except ValidationError:
                self.ignored += 1
        if not parsed:
            return
        with self.lock:
            self.version += 1
            for record_key, rollup in parsed:
                self._apply(record_key, rollup)

    def apply(self, record_key: str, rollup: UsageRollup) -> None:
        with self.lock:
            self.version += 1
            self._apply(record_key, rollup)

    def _apply(self, record_key: str, rollup: UsageRollup) -> None:
        key = rollup.key
        size = key.window_ms
        if size not in (MINUTE_MS, HOUR_MS):
            self.ignored += 1
            return
        self.records += 1
        keys = self._keys.setdefault((size, rollup.source_partition or 0), _Keys())
        start = key.window_start_ms
        seen = keys.latest.get(record_key)
        as_of = rollup.as_of_offset if rollup.as_of_offset is not None else -1
        if seen is not None and as_of < seen[0]:
            # written from an older state of the source partition (a worker that lost
            # the partition, or a re-publication racing a newer one): never go back
            self.ignored += 1
            return
        old = seen[1] if seen is not None else None
        if old is None and keys.watermark is not None and start < keys.watermark:
            # The last totals of this window were forgotten (bounded memory). A late
            # increment is new if its source offset is above every one seen; anything
            # else is a re-publication of a total already counted.
            offset = rollup.source_offset
            if offset is None or offset <= keys.max_late_offset:
                self.ignored += 1
                return
            delta = rollup.totals
        else:
            delta = rollup.totals if old is None else _diff(rollup.totals, old)
            if old is None:
                if start not in keys.by_window:
                    bisect.insort(keys.starts, start)
                    keys.by_window[start] = []
                keys.by_window[start].append(record_key)
            keys.latest[record_key] = (as_of, rollup.totals)
        if rollup.source_offset is not None:
            keys.max_late_offset = max(keys.max_late_offset, rollup.source_offset)
        elif keys.newest is None or start > keys.newest:
            keys.newest = start
            day = start // DAY_MS * DAY_MS
            for size_, start_ in ((size, start), (DAY_MS, day)):
                if size_ != DAY_MS or size == HOUR_MS:
                    self._newest[size_] = max(self._newest.get(size_, start_), start_)
        row: RowKey = (
            key.tenant,
            key.model,
            key.provider,
            key.status,
            key.user,
            key.attributes,
            key.late,
        )
        self._add(size, start, row, delta)
        if size == HOUR_MS:
            self._add(DAY_MS, start // DAY_MS * DAY_MS, row, delta)
        self._evict_keys(keys)

    def _add(self, size: int, start: int, row: RowKey, delta: UsageTotals) -> None:
        windows = self.rows[size]
        rows = windows.get(start)
        if rows is None:
            rows = windows[start] = {}
            starts = self.starts[size]
            bisect.insort(starts, start)
            keep = self.minute_keep_ms if size == MINUTE_MS else self.hour_keep_ms
            newest = self._newest.get(size, start)
            while starts and starts[0] < newest - keep:
                windows.pop(starts.pop(0), None)
            if start not in windows:
                return  # older than what is kept
        rows[row] = combine(rows.get(row, zero()), delta)

    def _evict_keys(self, keys: _Keys) -> None:
        starts = keys.starts
        if keys.newest is None:
            return
        while starts and starts[0] < keys.newest - self.key_keep_ms:
            start = starts.pop(0)
            for record_key in keys.by_window.pop(start, ()):
                keys.latest.pop(record_key, None)
            keys.watermark = start + 1

    # --- queries -------------------------------------------------------------------------

    def query(self, q: UsageQuery) -> dict[str, Any]:
        """One page of rows: ``{"rows": [...], "next_cursor": str | None}``."""
        size = WINDOWS_MS[q.window]
        after: tuple[int, tuple[str, ...]] | None = None
        if q.cursor is not None:
            after = _decode_cursor(q.cursor, q.window)
        filters = q.filters()
        attr_names = q.by_attributes
        by = set(q.by)
        classic = list(enumerate(ALL_DIMENSIONS))
        out: list[dict[str, Any]] = []
        next_cursor: str | None = None
        last_group: tuple[str, ...] = ()
        with self.lock:
            starts = self.starts[size]
            windows = self.rows[size]
            lo = 0
            if q.since_ms is not None:
                lo = bisect.bisect_right(starts, q.since_ms - size)
            if after is not None:
                lo = max(lo, bisect.bisect_left(starts, after[0]))
            for start in starts[lo:]:
                if q.until_ms is not None and start >= q.until_ms:
                    break
                groups: dict[tuple[str, ...], list[UsageTotals]] = {}
                for row, totals in windows[start].items():
                    attrs = dict(row[5]) if row[5] else {}
                    if filters and any(_value(row, attrs, d) != v for d, v in filters.items()):
                        continue
                    group: tuple[str, ...] = (
                        *(str(row[i]) if d in by else "*" for i, d in classic),
                        *(attrs.get(name, UNKNOWN) for name in attr_names),
                        str(row[6]),
                    )
                    parts = groups.get(group)
                    if parts is None:
                        groups[group] = [totals]
                    else:
                        parts.append(totals)
                for group in sorted(groups):
                    if after is not None and (start, group) <= after:
                        continue
                    if len(out) == q.limit:
                        last = out[-1]["key"]
                        next_cursor = _encode_cursor(q.window, last["window_start_ms"], last_group)
                        break
                    out.append(_row(start, size, group, _sum_totals(groups[group]), attr_names))
                    last_group = group
                if next_cursor is not None:
                    break
        return {"rows": out, "next_cursor": next_cursor}

    @property
    def size(self) -> int:
        """Rows held (all window sizes)."""
        return sum(len(r) for windows in self.rows.values() for r in windows.values())


def view_for(settings: Settings) -> UsageView:
    return UsageView(
        minute_keep_ms=int(settings.usage_view_minutes_s * 1000),
        hour_keep_ms=int(settings.usage_view_hours_s * 1000),
    )


def _partitions(settings: Settings, topics: Iterable[str] | None = None) -> list[Any]:
    from aiokafka import TopicPartition

    if topics is None:
        topics = (settings.topic_rollups, settings.rollups_hourly_topic)
    return [TopicPartition(topic, p) for topic in topics for p in range(settings.partitions)]


def _read_since_ms(settings: Settings, window: str, since_ms: int) -> int:
    """Rollup records of windows that end after ``since_ms`` were written after this
    time: a window's rollups are published once it has begun, by an event time at most
    ``usage_max_future_s`` ahead of the worker's clock (a later one is implausible and
    counted late, under its own window), and a 1-day row sums the hours of its whole day."""
    return max(since_ms - WINDOWS_MS[window] - int(settings.usage_max_future_s * 1000), 0)


async def load_view(
    settings: Settings, *, window: str | None = None, since_ms: int | None = None
) -> UsageView:
    """A view of what the rollup topics hold now (``chunkstitch usage``: one read).

    With a ``window``, only the topic its rows come from (1m: the 1-minute topic; 1h and
    1d: the hourly one); with a ``since_ms``, only the records written within that range
    (:func:`_read_since_ms`; the start found by ``offsets_at``, never a read of the
    retention). Without either, everything the two topics keep."""
    from processor.kafka import read_to_end

    view = UsageView(  # one-shot: whatever the topics keep, not the worker's periods
        minute_keep_ms=int(settings.retention_rollups_s * 1000),
        hour_keep_ms=int(settings.retention_rollups_hourly_s * 1000),
    )
    topics = None
    if window is not None:
        topics = [settings.topic_rollups if window == "1m" else settings.rollups_hourly_topic]
    parts = _partitions(settings, topics)
    since = None
    if since_ms is not None:
        since = dict.fromkeys(parts, _read_since_ms(settings, window or "1d", since_ms))

    def fold(records: list[Any]) -> None:
        view.apply_records((r.key, r.value) for r in records)

    def progress(p: Any) -> None:  # stderr: stdout may be --json
        print(
            f"reading the rollup topics: {p.records:,} records, {p.behind:,} to go "
            f"({p.elapsed_s:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    await read_to_end(
        settings,
        parts,
        timeout_s=settings.usage_read_stall_s,
        since_ms=since,
        on_records=fold,
        on_progress=progress,
    )
    view.caught_up = True
    return view


async def query_rollups(settings: Settings, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` (:class:`UsageQuery`) and answer them from the rollup topics.

    The data path of ``chunkstitch usage``: returns ``{"rows": [...], "next_cursor": ...}``
    and raises :class:`QueryError` (bad parameters) or ``BrokerUnreachable``."""
    query = UsageQuery.parse(params, limit_max=settings.usage_query_limit_max)
    view = await load_view(settings, window=query.window, since_ms=query.since_ms)
    return view.query(query)
