"""``chunkstitch usage``: usage rollups as a table (read from the rollup topic)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from processor.cli import app
from processor.cli._common import (
    BrokerOption,
    Col,
    broker_errors,
    fail,
    load_settings,
    print_rows,
    quiet_kafka_logs,
)

__all__ = ["usage"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DIMENSIONS = ("tenant", "model", "provider", "status", "user")
_WINDOWS = ("1m", "1h", "1d")
_STATUSES = ("complete", "incomplete", "error")


def time_ms(option: str, text: str | None, now_s: float | None = None) -> int | None:
    """``--since`` / ``--until``: a duration back from now (``15m``, ``1h``, ``7d``) or an
    ISO-8601 time (``2026-12-02T01:00Z``; UTC unless it says otherwise), in epoch ms."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        now = time.time() if now_s is None else now_s
        return int((now - int(match[1]) * _UNITS[match[2]]) * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        fail(
            f"{option} {text!r} is neither a duration nor a time; use a number and a unit "
            "(15m, 1h, 7d) or an ISO-8601 time (2026-12-02T01:00Z)"
        )
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def iso_utc(epoch_ms: int) -> str:
    """A window start as ISO-8601 in UTC, to the minute: ``2026-12-02T01:00Z``; one a
    calendar cannot show (rollups may hold any timestamp) as ``@<ms>ms``, never an error."""
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")
    except (OverflowError, OSError, ValueError):
        return f"@{epoch_ms}ms"


def latency_bound(buckets: list[int] | tuple[int, ...], q: float) -> str:
    """A quantile of a latency histogram as what the histogram knows: the bucket's upper
    bound as ``<= 10 ms`` (the value may be anywhere below it), ``> 60000 ms`` in the open
    last bucket, ``-`` with no values. The fold's ``percentile`` reports the bound alone."""
    from topics._usage import LATENCY_BUCKETS_MS

    total = sum(buckets)
    if total == 0:
        return "-"
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            if i >= len(LATENCY_BUCKETS_MS):
                return f"> {LATENCY_BUCKETS_MS[-1]} ms"
            return f"<= {LATENCY_BUCKETS_MS[i]} ms"
    return f"> {LATENCY_BUCKETS_MS[-1]} ms"  # pragma: no cover - the loop always returns


def _dims(by: str) -> list[str]:
    from topics._headers import check_attribute_name

    dims = [d.strip() for d in by.split(",") if d.strip()]
    unknown = [
        d
        for d in dims
        if d not in _DIMENSIONS and not (d.startswith("attr.") and not check_attribute_name(d[5:]))
    ]
    if unknown or not dims:
        fail(
            f"--by {by!r}: group by one or more of {','.join(_DIMENSIONS)},attr.NAME "
            "(comma separated)"
        )
    return [d for d in _DIMENSIONS if d in dims] + sorted({d for d in dims if d[:5] == "attr."})


def _attr_filters(attrs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in attrs:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--attr {item!r}: use NAME=VALUE, e.g. --attr feature=search")
        out["attr." + name.strip()] = value
    return out


@app.command()
def usage(
    since: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN", help="Only windows after WHEN: 15m, 1h, 7d ago, or an ISO-8601 time."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN", help="Only windows before WHEN: 15m, 1h, 7d ago, or an ISO-8601 time."
        ),
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            metavar="DIMS",
            help="Group by these of tenant,model,provider,status,user,attr.NAME.",
        ),
    ] = "tenant,model,provider",
    window: Annotated[str, typer.Option(metavar="SIZE", help="Window size: 1m, 1h or 1d.")] = "1h",
    tenant: Annotated[str | None, typer.Option(metavar="TENANT", help="Only this tenant.")] = None,
    status: Annotated[
        str | None,
        typer.Option(metavar="STATUS", help="Only this status: complete, incomplete or error."),
    ] = None,
    user: Annotated[str | None, typer.Option(metavar="USER", help="Only this user.")] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=VALUE", help="Only this attribute value; repeatable."),
    ] = None,
    limit: Annotated[int, typer.Option(metavar="N", help="At most N rows.")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    broker: BrokerOption = None,
    dsn: Annotated[
        str | None,
        typer.Option(help="PostgreSQL usage history for older ranges (CHUNKSTITCH_USAGE_DSN)."),
    ] = None,
) -> None:
    """Token usage, requests, cost and latency per window (no worker needed).

    Window times are UTC (ISO-8601). Latency is kept as a histogram: 'ttfc p95 <= 10 ms'
    means the 95th percentile of the time to first chunk lies in the bucket up to 10 ms.
    """
    from processor.usage import QueryError, query_rollups
    from processor.usage._history import history_rows

    # Every option is checked before connecting.
    since_ms, until_ms = time_ms("--since", since), time_ms("--until", until)
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        fail(f"--since {since!r} is not before --until {until!r}")
    dims = _dims(by)
    attr_filters = _attr_filters(attr or [])
    if window not in _WINDOWS:
        fail(f"--window {window!r}: use 1m, 1h or 1d")
    if status is not None and status not in _STATUSES:
        fail(f"--status {status!r} is not a status; use complete, incomplete or error")
    settings = load_settings(broker=broker)
    quiet_kafka_logs()
    history_query: dict[str, Any] = {
        "window": window,
        "by": dims,
        "since_ms": since_ms,
        "until_ms": until_ms,
        "filters": {
            "tenant": tenant or "",
            "status": status or "",
            "user": user or "",
            **attr_filters,
        },
        "limit": limit,
    }
    try:  # a range beyond the live retention, with a DSN: from PostgreSQL
        history = history_rows(settings, dsn, history_query)
    except ValueError as exc:
        fail(str(exc))
    if history is not None:
        rows = history
    else:
        params = {
            "since": since_ms,
            "until": until_ms,
            "window": window,
            "by": ",".join(dims),
            "tenant": tenant,
            "status": status,
            "user": user,
            "limit": limit,
            **attr_filters,
        }
        try:
            with broker_errors():
                page = asyncio.run(query_rollups(settings, params))
        except (QueryError, TimeoutError) as exc:
            fail(str(exc))
        rows = page["rows"]
        if page["next_cursor"] is not None:
            typer.echo(
                f"only the first {limit} rows: narrow --since/--until or raise --limit", err=True
            )
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    _table(rows, dims, window, settings.topic_rollups)
    if not rows:
        typer.echo("no usage yet: is a worker running (chunkstitch worker)?", err=True)


def _table(rows: list[dict[str, Any]], dims: list[str], window: str, topic: str) -> None:
    from rich.console import Console

    cols = [
        Col("window (UTC)"),
        *(Col(d) for d in dims),
        Col("requests", justify="right"),
        Col("no usage", justify="right", drop=1),
        Col("prompt", justify="right"),
        Col("output", justify="right"),
        Col("cost $", justify="right"),
        Col("est. $", justify="right", drop=1),  # from the price database, never mixed in
        Col("ttfc p95", justify="right"),
        Col("tok/s", justify="right", drop=2),
    ]
    out = []
    for row in rows:
        key, t = row["key"], row["totals"]
        out.append(
            [
                iso_utc(key["window_start_ms"]) + (" late" if key["late"] else ""),
                *(
                    str(key["attributes"].get(d[5:], "unknown"))
                    if d.startswith("attr.")
                    else str(key[d])
                    for d in dims
                ),
                str(t["requests"]),
                str(t["without_usage"]),
                f"{t['prompt_tokens']:,}",
                f"{t['completion_tokens']:,}",
                f"{row['cost_usd']:.4f}",
                f"{row['cost_estimated_usd']:.4f}",
                latency_bound(t["ttfc_ms_buckets"], 0.95),
                f"{row['output_tokens_per_s']:.1f}" if row["output_tokens_per_s"] else "-",
            ]
        )
    from processor.pricing import PRICE_DATA

    # est. $: estimated where the provider reported no cost, from this price data
    title = f"usage per {window} window ({topic}; est. $: {PRICE_DATA})"
    print_rows(Console(), cols, out, title=title)
