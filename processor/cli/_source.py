"""Where the capture commands (assemble, publish) read from: a file or stdin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

import typer

__all__ = ["READ_SIZE", "open_source"]

READ_SIZE = 64 * 1024


def open_source(source: str) -> tuple[BinaryIO, int | None]:
    """The byte stream of ``source`` ('-' = stdin) and its size when known (for progress).

    Exits with code 2 and a message saying what to pass when the file does not exist.
    """
    if source == "-":
        return sys.stdin.buffer, None
    path = Path(source)
    if path.is_dir():
        typer.echo(
            f"error: {source} is a directory; pass a JSON Lines or SSE file in it, or '-'",
            err=True,
        )
        raise typer.Exit(2)
    if not path.is_file():
        typer.echo(
            f"error: {source}: no such file; pass a JSON Lines or SSE file, or '-'", err=True
        )
        raise typer.Exit(2)
    return path.open("rb"), path.stat().st_size
