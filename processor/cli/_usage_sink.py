"""``chunkstitch usage sink``: write the rollup topic into PostgreSQL.

``chunkstitch usage`` is a plain command (``processor/cli/_usage.py``); this module turns
it into a group whose default action is that same command, so ``chunkstitch usage
[--since ..]`` is unchanged and ``chunkstitch usage sink --dsn ...`` is added.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

import typer

from processor.cli import app
from processor.cli._usage import usage as _usage_command

__all__ = ["sink", "usage_app"]

usage_app = typer.Typer(
    name="usage",
    help="Token usage, requests, cost and latency per window; "
    "`usage sink` stores it in PostgreSQL.",
    no_args_is_help=False,
)


def _as_group_callback(command: Any) -> Any:
    """``command`` as the group's callback: runs only when no sub-command is given."""

    @functools.wraps(command)
    def callback(ctx: typer.Context, **kwargs: Any) -> None:
        if ctx.invoked_subcommand is None:
            command(**kwargs)

    signature = inspect.signature(command, eval_str=True)  # typer reads the Annotated options
    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    callback.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[ctx_param, *signature.parameters.values()]
    )
    callback.__annotations__ = {"ctx": typer.Context, **command.__annotations__}
    return callback


# Replace the plain `usage` command by the group (same options, same default behaviour).
app.registered_commands[:] = [
    c for c in app.registered_commands if c.callback is not _usage_command
]
usage_app.callback(invoke_without_command=True)(_as_group_callback(_usage_command))
app.add_typer(usage_app)


@usage_app.command()
def sink(
    dsn: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL DSN, postgresql://user:password@host:5432/db (CHUNKSTITCH_USAGE_DSN)."
        ),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="Kafka bootstrap host:port.")] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Web port for /healthz, /readyz, /metrics (CHUNKSTITCH_USAGE_SINK_PORT)."
        ),
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="Consumer group (CHUNKSTITCH_USAGE_SINK_GROUP).")
    ] = None,
) -> None:
    """Upsert every usage rollup into PostgreSQL (idempotent; creates its schema) until Ctrl-C."""
    import asyncio

    from processor.logs import configure_logging
    from processor.settings import get_settings
    from processor.usage._sink import SinkConfigError, run_sink

    settings = get_settings(broker=broker, usage_sink_port=port, usage_sink_group=group)
    configure_logging(settings.log_level, settings.log_format)
    if dsn is None and settings.usage_dsn is not None:
        dsn = settings.usage_dsn.get_secret_value()
    if not dsn:
        typer.echo(
            "error: no database: pass --dsn postgresql://user:password@host:5432/db "
            "or set CHUNKSTITCH_USAGE_DSN",
            err=True,
        )
        raise typer.Exit(2)
    if not dsn.startswith(("postgresql://", "postgres://")):
        typer.echo(
            "error: --dsn must start with postgresql:// (e.g. postgresql://u:pw@host/db)", err=True
        )
        raise typer.Exit(2)
    from aiokafka.errors import KafkaConnectionError

    from processor.kafka import unreachable_message

    try:
        asyncio.run(run_sink(settings, dsn))
    except KafkaConnectionError as exc:
        typer.echo(f"error: {unreachable_message(settings, exc)}", err=True)
        raise typer.Exit(2) from None
    except SinkConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(
            f"error: cannot serve the sink's web port {settings.usage_sink_port} ({exc}); "
            "choose another with --port or CHUNKSTITCH_USAGE_SINK_PORT",
            err=True,
        )
        raise typer.Exit(2) from None
