"""``chunkstitch consume``: print finished responses (a table, or JSON Lines with --json)."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

from processor.cli import app

__all__ = ["consume"]


@app.command()
def consume(
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest response.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Exit 0 after this many responses.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Exit 0 after this many seconds with no record.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only responses of this tenant.")] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Only this status: complete, incomplete or error."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of a table.")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(help="Consumer group: commit offsets and resume where it stopped."),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="host:port (default: CHUNKSTITCH_BROKER).")
    ] = None,
) -> None:
    """Print finished chat.completion responses from the response topic."""
    from processor.clients import ClientError
    from processor.logs import configure_logging
    from processor.settings import get_settings

    if status is not None and status not in ("complete", "incomplete", "error"):
        typer.echo(
            f"error: --status {status!r} is not a status; use complete, incomplete or error",
            err=True,
        )
        raise typer.Exit(2)
    settings = get_settings(broker=broker)
    configure_logging(settings.log_level, settings.log_format)  # logs go to stderr
    try:
        asyncio.run(_run(settings, from_beginning, limit, timeout, tenant, status, json_out, group))
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _preview(response: Any) -> str:
    if not response.choices:
        return ""
    message = response.choices[0].message
    text = message.content or ""
    if not text and message.tool_calls:
        text = "tool: " + ", ".join(str(c.function.name) for c in message.tool_calls)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


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
    from rich.table import Table

    from processor.clients import Consumer

    start = "earliest" if from_beginning else ("committed" if group else "latest")
    consumer = Consumer(
        settings,
        group_id=group,
        start=start,  # type: ignore[arg-type]
        tenant=tenant,
        status=status,  # type: ignore[arg-type]
        idle_timeout_s=idle_timeout,
    )
    console = Console()
    table = Table("id", "model", "status", "tenant", "provider", "chunks", "tokens", "content")
    count = 0
    async with consumer:
        try:
            async for response in consumer:
                count += 1
                if json_out:
                    sys.stdout.write(response.to_json().decode() + "\n")
                    sys.stdout.flush()
                else:
                    meta = response.chunkstitch
                    table.add_row(
                        response.id,
                        response.model,
                        meta.status + (f" ({meta.reason})" if meta.reason else ""),
                        meta.tenant or "",
                        meta.provider or response.provider or "",
                        str(meta.chunk_count),
                        str(response.usage.total_tokens) if response.usage else "",
                        _preview(response),
                    )
                if limit is not None and count >= limit:
                    break
        finally:
            if not json_out:
                console.print(table)
                console.print(f"{count} response(s)", style="dim")
