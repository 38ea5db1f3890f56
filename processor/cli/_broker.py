"""``chunkstitch broker``: the embedded broker in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app

__all__ = ["broker"]


@app.command()
def broker(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 9092) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) until Ctrl-C."""
    import signal

    from processor.broker import BrokerError, EmbeddedBroker

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)

    try:
        running = EmbeddedBroker(port).start()
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"embedded broker listening on {running.bootstrap} (memory storage: a restart loses "
        f"everything).\nPoint clients at it with CHUNKSTITCH_BROKER={running.bootstrap}; "
        "Ctrl-C stops it."
    )
    try:
        code = running.wait()
    except KeyboardInterrupt:
        typer.echo("\nstopping the embedded broker")
        code = 0
    finally:
        running.stop()
    raise typer.Exit(code)
