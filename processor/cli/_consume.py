"""``chunkstitch consume``: print finished responses (a table, or JSON Lines with --json)."""

from __future__ import annotations

import asyncio
import sys
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

__all__ = ["consume"]

_STATUSES = ("complete", "incomplete", "error")

COLUMNS = (
    Col("id"),
    Col("status"),
    Col("tenant", drop=1),
    Col("model", drop=2),
    Col("provider", drop=4),
    Col("chunks", justify="right", drop=3),
    Col("tokens", justify="right"),
    Col("content", flex=True),
)


@app.command()
def consume(
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest response.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Exit 0 after N responses.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, metavar="SECONDS", help="Exit 0 after SECONDS with no record."),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(metavar="TENANT", help="Only responses of this tenant.")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(metavar="STATUS", help="Only this status: complete, incomplete or error."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of a table.")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(
            metavar="GROUP", help="Consumer group: commit offsets and resume where it stopped."
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(
            metavar="TOPIC",
            help="Response topic to read (default: CHUNKSTITCH_TOPIC_RESPONSES, "
            "else chunkstitch.responses).",
        ),
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Print finished chat.completion responses from the response topic.

    A table that fits the terminal (80 columns when piped; set COLUMNS to change it), or
    one JSON object per line with --json. Without --limit or --timeout it runs until
    Ctrl-C, then prints what it got.
    """
    from processor.logs import configure_logging

    if status is not None and status not in _STATUSES:
        fail(f"--status {status!r} is not a status; use complete, incomplete or error")
    settings = load_settings(broker=broker, topic_responses=topic)
    configure_logging(settings.log_level, settings.log_format)  # logs go to stderr
    quiet_kafka_logs()
    with broker_errors():
        asyncio.run(_run(settings, from_beginning, limit, timeout, tenant, status, json_out, group))


def _preview(response: Any) -> str:
    if not response.choices:
        return ""
    message = response.choices[0].message
    text = message.content or ""
    if not text and message.tool_calls:
        text = "tool: " + ", ".join(str(c.function.name) for c in message.tool_calls)
    text = " ".join(text.split())
    if len(response.choices) > 1:
        text = f"[{len(response.choices)} choices] {text}"
    return text if len(text) <= 200 else text[:199] + "…"


def row(response: Any) -> list[str]:
    """The table row of one finished response (the columns of :data:`COLUMNS`)."""
    meta = response.chunkstitch
    return [
        response.id,
        meta.status,
        meta.tenant or "",
        response.model or "",
        meta.provider or response.provider or "",
        str(meta.chunk_count),
        str(response.usage.total_tokens) if response.usage else "",
        (f"({meta.reason}) " if meta.reason and meta.status != "complete" else "")
        + _preview(response),
    ]


async def _run(
    settings: Any,
    from_beginning: bool,
    limit: int | None,
    idle_timeout: float | None,
    tenant: str | None,
    status: str | None,
    json_out: bool,
    group: str | None,
) -> None:
    from rich.console import Console

    from processor.clients import Consumer

    start = "earliest" if from_beginning else ("committed" if group else "latest")
    consumer = Consumer(
        settings,
        group_id=group,
        start=start,  # type: ignore[arg-type]
        tenant=tenant,
        status=status,  # type: ignore[arg-type]
        idle_timeout_s=idle_timeout,
        topic=settings.topic_responses,
    )
    console = Console()
    rows: list[list[str]] = []
    count = 0
    async with consumer:
        try:
            async for response in consumer:
                count += 1
                if json_out:
                    sys.stdout.write(response.to_json().decode() + "\n")
                    sys.stdout.flush()
                else:
                    rows.append(row(response))
                if limit is not None and count >= limit:
                    break
        finally:
            if not json_out:
                if rows:
                    print_rows(console, COLUMNS, rows)
                console.print(f"{count} response(s)", style="dim", highlight=False)
