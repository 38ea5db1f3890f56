"""The ``chunkstitch`` command line (typer).

Each command lives in its own private module and registers itself on :data:`app`;
this module only imports them. Keep imports inside command functions cheap: heavy
modules (faust, aiokafka) are imported lazily so ``chunkstitch assemble`` starts fast.
"""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="chunkstitch",
    help="Reassemble streamed LLM chat.completion.chunk records on Kafka into finished responses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """chunkstitch: reassemble streamed LLM chunks on Kafka into finished responses."""


# Command modules register themselves on `app` when imported (one import per module).
from processor.cli import (  # noqa: E402
    _assemble,  # noqa: F401
    _broker,  # noqa: F401
    _consume,  # noqa: F401
    _demo,  # noqa: F401
    _publish,  # noqa: F401
    _topics,  # noqa: F401
    _usage,  # noqa: F401
    _worker,  # noqa: F401
)


def main() -> None:
    """Console-script entry point."""
    app()
