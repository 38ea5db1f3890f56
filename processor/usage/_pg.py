"""Usage history in PostgreSQL: the schema (versioned migrations), idempotent upserts of
rollup records, and queries that answer like :func:`processor.usage.aggregate`.

One row per rollup key (window start, window size, dimensions, source partition) with
every measure of :class:`topics.UsageTotals` (histogram buckets as ``bigint[]``), so any
range can be summed and its percentiles recomputed. Each row remembers the rollup-topic
partition and offset it came from; an upsert replaces a row only with a record from a
*later* offset, so replays, duplicates, redelivery out of order and restarts all converge
to the latest totals on the topic. No ORM: hand-written SQL, asyncpg.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from processor.core import WINDOWS_MS, result
from topics import LATENCY_BUCKETS_MS, UsageKey, UsageRollup, UsageTotals
from topics._headers import check_attribute_name

__all__ = [
    "MEASURES",
    "MIGRATIONS",
    "TABLE",
    "InvalidRollup",
    "Row",
    "migrate",
    "query_page",
    "query_usage",
    "redact_dsn",
    "row_of",
    "schema_version",
    "upsert",
]

MINUTE_MS = WINDOWS_MS["1m"]
TABLE = "chunkstitch_usage_rollup"
VERSION_TABLE = "chunkstitch_schema_version"
_STAGE = "chunkstitch_usage_rollup_in"
DIMENSIONS = ("tenant", "model", "provider", "status")
LABEL_COLUMNS = ("end_user", "attributes")
"""The user (``end_user``: ``user`` is reserved in SQL) and the attributes (jsonb)."""
KEY_COLUMNS = (
    "window_start_ms",
    "window_ms",
    *DIMENSIONS,
    "late",
    "source_partition",
    "source_offset",
    *LABEL_COLUMNS,
)
"""A late increment (one completion counted after its window closed) carries the source
offset of that completion; every other row has source_offset -1."""
MEASURES: tuple[str, ...] = tuple(UsageTotals.model_fields)
"""Every measure of the rollup, one column each (a unit test keeps this and the schema equal)."""
_ARRAYS = {"ttfc_ms_buckets", "duration_ms_buckets"}
COLUMNS = (*KEY_COLUMNS, *MEASURES, "final", "rollup_partition", "rollup_offset")
_INT64 = (-(2**63), 2**63 - 1)
_N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1

# (version, name, SQL). Append only: a released migration is never edited.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "usage rollup table",
        f"""
CREATE TABLE {TABLE} (
    window_start_ms bigint NOT NULL,
    window_ms bigint NOT NULL,
    window_start timestamptz GENERATED ALWAYS AS (to_timestamp(window_start_ms / 1000.0)) STORED,
    tenant text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    status text NOT NULL,
    late boolean NOT NULL,
    source_partition integer NOT NULL,
    source_offset bigint NOT NULL DEFAULT -1,
    requests bigint NOT NULL DEFAULT 0,
    complete bigint NOT NULL DEFAULT 0,
    incomplete bigint NOT NULL DEFAULT 0,
    error bigint NOT NULL DEFAULT 0,
    without_usage bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    reasoning_tokens bigint NOT NULL DEFAULT 0,
    cost_nano_usd bigint NOT NULL DEFAULT 0,
    with_cost bigint NOT NULL DEFAULT 0,
    cost_estimated_nano_usd bigint NOT NULL DEFAULT 0,
    with_cost_estimated bigint NOT NULL DEFAULT 0,
    ttfc_ms_buckets bigint[] NOT NULL,
    duration_ms_buckets bigint[] NOT NULL,
    rate_tokens bigint NOT NULL DEFAULT 0,
    rate_duration_ms bigint NOT NULL DEFAULT 0,
    final boolean NOT NULL DEFAULT false,
    rollup_partition integer NOT NULL,
    rollup_offset bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start_ms, window_ms, tenant, model, provider, status, late,
                 source_partition, source_offset)
);
CREATE INDEX {TABLE}_time ON {TABLE} (window_ms, window_start_ms);
COMMENT ON TABLE {TABLE} IS
    'chunkstitch usage rollups: absolute totals per window, dimensions and source partition '
    '(sum over source_partition); written by chunkstitch usage sink';
""",
    ),
    (
        2,
        "views per tenant per day, per model per hour",
        f"""
CREATE VIEW chunkstitch_usage_tenant_daily AS
SELECT date_trunc('day', window_start, 'UTC') AS day,
       tenant,
       sum(requests)::bigint AS requests,
       sum(complete)::bigint AS complete,
       sum(incomplete)::bigint AS incomplete,
       sum(error)::bigint AS error,
       sum(without_usage)::bigint AS without_usage,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(cost_nano_usd) / 1e9 AS cost_usd,
       sum(cost_estimated_nano_usd) / 1e9 AS cost_estimated_usd
FROM {TABLE}
WHERE window_ms = {MINUTE_MS}
GROUP BY 1, 2;
CREATE VIEW chunkstitch_usage_model_hourly AS
SELECT date_trunc('hour', window_start, 'UTC') AS hour,
       model,
       provider,
       sum(requests)::bigint AS requests,
       sum(error)::bigint AS error,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(cost_nano_usd) / 1e9 AS cost_usd,
       sum(rate_tokens) * 1000.0 / nullif(sum(rate_duration_ms), 0) AS output_tokens_per_s,
       sum(cost_estimated_nano_usd) / 1e9 AS cost_estimated_usd
FROM {TABLE}
WHERE window_ms = {MINUTE_MS}
GROUP BY 1, 2, 3;
""",
    ),
    (
        3,
        "user and attribute dimensions",
        f"""
ALTER TABLE {TABLE}
    ADD COLUMN end_user text NOT NULL DEFAULT 'unknown',
    ADD COLUMN attributes jsonb NOT NULL DEFAULT '{{}}'::jsonb;
ALTER TABLE {TABLE} DROP CONSTRAINT {TABLE}_pkey;
ALTER TABLE {TABLE} ADD PRIMARY KEY (window_start_ms, window_ms, tenant, model, provider,
    status, late, source_partition, source_offset, end_user, attributes);
COMMENT ON COLUMN {TABLE}.end_user IS 'cs-user of the completions (other: beyond the cap)';
COMMENT ON COLUMN {TABLE}.attributes IS
    'allowlisted cs-attr-<name> headers, {{name: value}} (other: beyond the cap)';
""",
    ),
)


_NOT_IN_ROWS = {"source_partition", "source_offset", "final"}
"""Per-record fields of a rollup that a query row (a sum over records) does not have."""


class InvalidRollup(ValueError):
    """A rollup record that validates as JSON but cannot be stored (the message says why)."""


Row = tuple[Any, ...]
"""One table row in :data:`COLUMNS` order."""


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for log lines and error messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_text(name: str, value: str) -> str:
    if "\x00" in value:
        raise InvalidRollup(f"{name} contains a NUL character, which PostgreSQL text cannot hold")
    return value


def _check_int(name: str, value: int) -> int:
    if not _INT64[0] <= value <= _INT64[1]:
        raise InvalidRollup(f"{name}={value} does not fit a 64-bit integer")
    return value


def row_of(rollup: UsageRollup, rollup_partition: int, rollup_offset: int) -> Row:
    """The table row of one rollup record (raises :class:`InvalidRollup`)."""
    key, totals = rollup.key, rollup.totals
    values: list[Any] = [
        _check_int("window_start_ms", key.window_start_ms),
        _check_int("window_ms", key.window_ms),
        *(_check_text(d, getattr(key, d)) for d in DIMENSIONS),
        key.late,
        -1 if rollup.source_partition is None else rollup.source_partition,
        _source_offset(rollup),
        _check_text("user", key.user),
        json.dumps(dict(key.attributes), sort_keys=True, separators=(",", ":")),
    ]
    for name, value in key.attributes:
        _check_text(f"attribute {name}", name + value)
    if key.window_ms <= 0:
        raise InvalidRollup(f"window_ms={key.window_ms} is not a positive window size")
    for name in MEASURES:
        value = getattr(totals, name)
        if name in _ARRAYS:
            if len(value) != _N_BUCKETS:
                raise InvalidRollup(
                    f"{name} has {len(value)} buckets, the histogram has {_N_BUCKETS}"
                )
            values.append([_check_int(name, v) for v in value])
        else:
            values.append(_check_int(name, value))
    values += [bool(getattr(rollup, "final", False)), rollup_partition, rollup_offset]
    return tuple(values)


def _source_offset(rollup: UsageRollup) -> int:
    offset = getattr(rollup, "source_offset", None)  # set on late increments only
    return -1 if offset is None else _check_int("source_offset", int(offset))


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest migration applied (0 on an empty database)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE)
    if not exists:
        return 0
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}"))


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations not applied yet, in one transaction, serialised by an advisory
    lock (several sinks may start at once). Returns the versions applied now."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('chunkstitch.migrate'))")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch(f"SELECT version FROM {VERSION_TABLE}")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                f"INSERT INTO {VERSION_TABLE} (version, name) VALUES ($1, $2)", version, name
            )
            applied_now.append(version)
    return applied_now


def _stage_ddl() -> str:
    cols = []
    for c in COLUMNS:
        if c in _ARRAYS:
            kind = "bigint[]"
        elif c in DIMENSIONS or c == "end_user":
            kind = "text"
        elif c == "attributes":
            kind = "jsonb"
        elif c in ("late", "final"):
            kind = "boolean"
        elif c in ("source_partition", "rollup_partition"):
            kind = "integer"
        else:
            kind = "bigint"
        cols.append(f"{c} {kind}")
    return f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ({', '.join(cols)}) ON COMMIT DELETE ROWS"


_UPSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM {_STAGE} "
    f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET "
    + ", ".join(
        f"{c} = EXCLUDED.{c}" for c in (*MEASURES, "final", "rollup_partition", "rollup_offset")
    )
    + ", updated_at = now() "
    f"WHERE {TABLE}.rollup_partition <> EXCLUDED.rollup_partition "
    f"OR {TABLE}.rollup_offset < EXCLUDED.rollup_offset"
)


def latest_per_key(rows: Iterable[Row]) -> list[Row]:
    """One row per key, the one from the highest offset (one INSERT cannot touch a row twice)."""
    n = len(KEY_COLUMNS)
    best: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        key = row[:n]
        old = best.get(key)
        if old is None or old[-1] < row[-1]:
            best[key] = row
    return list(best.values())


async def upsert(conn: asyncpg.Connection, rows: Sequence[Row]) -> int:
    """Write rows in one transaction (COPY into a staging table, then one INSERT .. ON
    CONFLICT that keeps, per key, the record from the later rollup offset). Returns the
    number of rows inserted or changed."""
    rows = latest_per_key(rows)
    if not rows:
        return 0
    async with conn.transaction():
        await conn.execute(_stage_ddl())
        await conn.copy_records_to_table(_STAGE, records=rows, columns=list(COLUMNS))
        status = await conn.execute(_UPSERT)
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True)
class _Group:
    sql: str
    args: list[Any]
    attrs: tuple[str, ...] = ()
    """The attribute names grouped by, in the order of the columns a_0, a_1, ..."""


_GROUPABLE = (*DIMENSIONS, "user")


def _attr_name(dim: str) -> str:
    name = dim[5:]
    problem = check_attribute_name(name)
    if problem:  # also what keeps the name safe to write into the SQL text
        raise ValueError(f"{dim!r}: {problem}")
    return name


def _column(dim: str) -> str:
    """The SQL expression of a dimension (``attr.<name>``: ``unknown`` when absent)."""
    if dim == "user":
        return "end_user"
    if dim.startswith("attr."):
        return f"coalesce(attributes->>'{_attr_name(dim)}', 'unknown')"
    if dim not in DIMENSIONS:
        raise ValueError(f"cannot use {dim!r}; choose from {', '.join(_GROUPABLE)} or attr.<name>")
    return dim


def _query_sql(
    window: str,
    by: Sequence[str],
    since_ms: int | None,
    until_ms: int | None,
    filters: Mapping[str, str] | None,
    limit: int | None,
    source_window_ms: int,
    after: tuple[int, tuple[str, ...]] | None = None,
) -> _Group:
    if window not in WINDOWS_MS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS_MS)}, got {window!r}")
    for d in by:
        _column(d)
    attrs = tuple(sorted(_attr_name(d) for d in set(by) if d.startswith("attr.")))
    size = WINDOWS_MS[window]
    args: list[Any] = [size, source_window_ms]
    where = ["window_ms = $2"]
    if since_ms is not None:
        args.append(since_ms)
        where.append(f"window_start_ms + window_ms > ${len(args)}")
    if until_ms is not None:
        args.append(until_ms)
        where.append(f"window_start_ms < ${len(args)}")
    for dim, value in (filters or {}).items():
        column = _column(dim)
        if value:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    names = [*DIMENSIONS, "end_user", *(f"a_{i}" for i in range(len(attrs)))]
    exprs = [*DIMENSIONS, "end_user", *(_column("attr." + a) for a in attrs)]
    grouped = [*(d in by for d in _GROUPABLE), *(True for _ in attrs)]
    dims = [
        f"{e} AS {n}" if g else f"'*'::text AS {n}"
        for e, n, g in zip(exprs, names, grouped, strict=True)
    ]
    sums = []
    for m in MEASURES:
        if m in _ARRAYS:
            sums += [f"sum({m}[{i}])::bigint AS {m}_{i}" for i in range(1, _N_BUCKETS + 1)]
        else:
            sums.append(f"sum({m})::bigint AS {m}")
    group = ["1", *(str(i + 2) for i, g in enumerate(grouped) if g), "late"]
    # the order of the live view: by code point (C collation), not the database's locale
    ordered = [f'{n} COLLATE "C"' for n in names]
    sql = (
        f"SELECT * FROM (SELECT (window_start_ms / $1) * $1 AS window_start_ms, "
        f"{', '.join(dims)}, late, {', '.join(sums)} FROM {TABLE} "
        f"WHERE {' AND '.join(where)} GROUP BY {', '.join(group)}) AS g "
        f"ORDER BY window_start_ms, {', '.join(ordered)}, late"
    )
    if after is not None:  # keyset page: rows after (window start, group) in this order
        after_start, after_group = after
        if len(after_group) != len(names) + 1:
            raise ValueError(_BAD_CURSOR)
        marks: list[str] = []
        bound: list[Any] = [after_start, *after_group[:-1], after_group[-1] == "True"]
        for value in bound:
            args.append(value)
            marks.append(f"${len(args)}")
        sql = sql.replace(
            ") AS g ORDER BY",
            f") AS g WHERE (window_start_ms, {', '.join(ordered)}, late) > "
            f"({', '.join(marks)}) ORDER BY",
        )
    if limit is not None:
        args.append(limit)
        sql += f" LIMIT ${len(args)}"
    return _Group(sql, args, attrs)


_BAD_CURSOR = (
    "cursor is not one this query returned: pass next_cursor unchanged, with the same window and by"
)


async def query_usage(
    pool: asyncpg.Pool | asyncpg.Connection,
    window: str = "1m",
    by: Sequence[str] = DIMENSIONS,
    since_ms: int | None = None,
    until_ms: int | None = None,
    filters: Mapping[str, str] | None = None,
    limit: int | None = None,
    *,
    source_window_ms: int = MINUTE_MS,
) -> list[dict[str, Any]]:
    """Usage from the database, rows shaped exactly as :func:`processor.usage.aggregate`
    returns them (same keys, totals, percentiles, order), over the 1-minute rows (the finest
    resolution, kept for as long as the database keeps them)."""
    q = _query_sql(window, by, since_ms, until_ms, filters, limit, source_window_ms)
    return await _fetch(pool, q, WINDOWS_MS[window])


async def _fetch(
    pool: asyncpg.Pool | asyncpg.Connection, q: _Group, size: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rec in await pool.fetch(q.sql, *q.args):
        key = UsageKey(
            window_start_ms=rec["window_start_ms"],
            window_ms=size,
            tenant=rec["tenant"],
            model=rec["model"],
            provider=rec["provider"],
            status=rec["status"],
            late=rec["late"],
            user=rec["end_user"],
            attributes=tuple((a, rec[f"a_{i}"]) for i, a in enumerate(q.attrs)),
        )
        values: dict[str, Any] = {}
        for m in MEASURES:
            if m in _ARRAYS:
                values[m] = tuple(rec[f"{m}_{i}"] for i in range(1, _N_BUCKETS + 1))
            else:
                values[m] = rec[m]
        out.append(result(key, UsageTotals(**values)).model_dump(exclude=_NOT_IN_ROWS))
    return out


def _cursor(window: str, row: Mapping[str, Any]) -> str:
    key = row["key"]
    group = [
        key["tenant"],
        key["model"],
        key["provider"],
        key["status"],
        key["user"],
        *(v for _, v in sorted(key["attributes"].items())),
        str(key["late"]),
    ]
    raw = json.dumps([window, key["window_start_ms"], group], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str, window: str) -> tuple[int, tuple[str, ...]]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        w, start, group = json.loads(raw)
        if w != window or not isinstance(start, int) or not isinstance(group, list):
            raise ValueError
        if len(group) < 6:
            raise ValueError
        return start, tuple(str(x) for x in group)
    except (ValueError, TypeError):
        raise ValueError(_BAD_CURSOR) from None


async def query_page(pool: asyncpg.Pool | asyncpg.Connection, q: Any) -> dict[str, Any]:
    """One page ``{"rows": [...], "next_cursor": str | None}`` for a usage query model
    (``window``, ``by``, ``since_ms``, ``until_ms``, ``tenant``/``model``/``provider``/
    ``status``/``user``/attributes, ``limit``, ``cursor``), the semantics of the live
    read model: ``since`` and ``until`` select whole windows of the query's size (a
    window is in when it ends after ``since`` and starts before ``until``), rows ordered
    by window start then group, the cursor that of the last row returned."""
    size = WINDOWS_MS[q.window]
    since = None if q.since_ms is None else q.since_ms // size * size
    until = None if q.until_ms is None else -(-q.until_ms // size) * size
    filters = q.filters()
    after = None if q.cursor is None else _after(q.cursor, q.window)
    rows = await _fetch(
        pool,
        _query_sql(q.window, q.by, since, until, filters, q.limit + 1, MINUTE_MS, after),
        size,
    )
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return {"rows": rows, "next_cursor": _cursor(q.window, rows[-1]) if more else None}
