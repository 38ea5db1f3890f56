"""``chunkstitch usage``: usage rollups as a table (read from the rollup topic)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Annotated

import typer

from processor.cli import app

__all__ = ["usage"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since_ms(text: str | None) -> int | None:
    if not text:
        return None
    match = re.fullmatch(r"(\d+)([smhd])", text)
    if not match:
        raise typer.BadParameter(f"{text!r}: use a number and a unit, e.g. 15m, 1h, 7d")
    return int((time.time() - int(match[1]) * _UNITS[match[2]]) * 1000)


@app.command()
def usage(
    since: Annotated[
        str | None, typer.Option(help="Only windows in the last 15m / 1h / 7d ...")
    ] = None,
    by: Annotated[
        str, typer.Option(help="Group by these of tenant,model,provider,status.")
    ] = "tenant,model,provider",
    window: Annotated[str, typer.Option(help="Window size: 1m, 1h or 1d.")] = "1h",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    broker: Annotated[str | None, typer.Option(help="Kafka bootstrap host:port.")] = None,
) -> None:
    """Token usage, requests, cost and latency per window (no worker needed)."""
    from processor.kafka import BrokerUnreachable
    from processor.settings import get_settings
    from processor.usage import aggregate, read_rollups

    settings = get_settings(broker=broker)
    try:
        rows = aggregate(
            asyncio.run(read_rollups(settings)),
            window=window,
            by=[d.strip() for d in by.split(",") if d.strip()],
            since_ms=_since_ms(since),
            filters={"tenant": tenant or ""},
        )
    except BrokerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"usage per {window} window ({settings.topic_rollups})")
    for col in (
        "window",
        "tenant",
        "model",
        "provider",
        "status",
        "requests",
        "no usage",
        "prompt",
        "completion",
        "cost $",
        "ttfc p95",
        "tok/s",
    ):
        table.add_column(
            col,
            justify="right"
            if col not in ("window", "tenant", "model", "provider", "status")
            else "left",
        )
    for row in rows:
        key, t = row["key"], row["totals"]
        start = datetime.fromtimestamp(key["window_start_ms"] / 1000, UTC).strftime(
            "%Y-%m-%d %H:%M"
        )
        table.add_row(
            start + (" late" if key["late"] else ""),
            key["tenant"],
            key["model"],
            key["provider"],
            key["status"],
            str(t["requests"]),
            str(t["without_usage"]),
            f"{t['prompt_tokens']:,}",
            f"{t['completion_tokens']:,}",
            f"{row['cost_usd']:.4f}",
            f"{row['ttfc_ms_p95']} ms" if row["ttfc_ms_p95"] is not None else "-",
            f"{row['output_tokens_per_s']:.1f}" if row["output_tokens_per_s"] else "-",
        )
    Console().print(table)
    if not rows:
        typer.echo("no usage yet: is a worker running (chunkstitch worker)?", err=True)
