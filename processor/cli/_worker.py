"""``chunkstitch worker``: run the stream processor."""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app

__all__ = ["worker"]


@app.command()
def worker(
    broker: Annotated[
        str | None, typer.Option(help="Kafka bootstrap host:port (CHUNKSTITCH_BROKER).")
    ] = None,
    web_port: Annotated[
        int | None,
        typer.Option(help="Web port for /healthz, /readyz, /metrics (CHUNKSTITCH_WEB_PORT)."),
    ] = None,
) -> None:
    """Run the worker: reassemble chunks into finished responses until Ctrl-C."""
    from processor.settings import get_settings
    from processor.worker import run_worker

    run_worker(get_settings(broker=broker, web_port=web_port))
