"""``chunkstitch worker``: run the stream processor."""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app
from processor.cli._common import BrokerOption, load_settings

__all__ = ["worker"]


@app.command()
def worker(
    broker: BrokerOption = None,
    web_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Web port for /healthz, /readyz, /metrics (default: CHUNKSTITCH_WEB_PORT, "
            "else 6066).",
        ),
    ] = None,
    usage_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Port of GET /usage, served off the worker's event loop (default: "
            "CHUNKSTITCH_USAGE_PORT, else 6068).",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            metavar="LEVEL",
            help="DEBUG, INFO, WARNING or ERROR (default: CHUNKSTITCH_LOG_LEVEL, else INFO).",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            metavar="FORMAT",
            help="auto (console lines on a terminal, JSON lines otherwise), json or console "
            "(default: CHUNKSTITCH_LOG_FORMAT, else auto).",
        ),
    ] = None,
) -> None:
    """Run the worker: reassemble chunks into finished responses until Ctrl-C.

    Logs go to stderr. Exit codes: 0 after Ctrl-C or SIGTERM, 1 when outputs could not be
    written (restart it: unacknowledged records are replayed), 2 when it cannot start
    (no broker, bad setting, web or usage port in use).
    """
    from processor.worker import run_worker

    settings = load_settings(
        broker=broker,
        web_port=web_port,
        usage_port=usage_port,
        log_level=log_level.upper() if log_level else None,
        log_format=log_format.lower() if log_format else None,
    )
    run_worker(settings)
