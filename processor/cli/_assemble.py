"""``chunkstitch assemble``: chunks (JSON Lines or an SSE capture) in, finished responses out.

The work is done by :mod:`processor._offline` (no typer, no Kafka client); the console
script runs it without loading the rest of the CLI when the command line is a plain
``assemble [--pretty] [--single] [FILE|-]`` (``processor/_entry.py``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from processor.cli import app

__all__ = ["assemble"]


@app.command()
def assemble(
    source: Annotated[
        str | None,
        typer.Argument(
            help="A JSON Lines file or raw SSE capture; '-' reads stdin (the default when "
            "input is piped).",
            show_default=False,
        ),
    ] = None,
    pretty: Annotated[bool, typer.Option("--pretty", help="Indent the JSON for humans.")] = False,
    single: Annotated[
        bool,
        typer.Option(
            "--single",
            "--one-stream",
            help="The capture is ONE stream: assemble every chunk into one completion "
            "whatever its chunks' ids say (Groq compound models give each chunk a new id).",
        ),
    ] = False,
) -> None:
    """Reassemble chunk streams into finished chat.completion objects (one JSON per line).

    Several completions may be interleaved; they are grouped by id and printed in
    first-seen order. Bad lines are reported on stderr with their line number; the rest
    is still assembled and the exit code is 1. An input without any chunk is an error
    (exit 1).
    """
    from processor import _offline

    try:
        code = _offline.assemble(source, pretty=pretty, single=single)
    except _offline.AssembleExit as exc:
        raise typer.Exit(exc.code) from None
    _offline.exit_now(code)
    if code:
        raise typer.Exit(code)
