"""``chunkstitch assemble``: chunks (JSON Lines or an SSE capture) in, finished responses out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from processor.cli import app

__all__ = ["assemble"]

_READ_SIZE = 64 * 1024


@app.command()
def assemble(
    source: Annotated[
        str, typer.Argument(help="A JSON Lines file or raw SSE capture; '-' reads stdin.")
    ] = "-",
    pretty: Annotated[bool, typer.Option("--pretty", help="Indent the JSON for humans.")] = False,
) -> None:
    """Reassemble chunk streams into finished chat.completion objects (one JSON per line).

    Several completions may be interleaved; they are grouped by id and printed in
    first-seen order. Bad lines are reported on stderr with their line number; the rest
    is still assembled and the exit code is 1.
    """
    from processor.core import ChunkLineDecoder, ChunkRejected, Payload, StreamGrouper, parse_chunk

    grouper = StreamGrouper()
    decoder = ChunkLineDecoder()
    bad = 0

    def take(items: list[Payload]) -> None:
        nonlocal bad
        for item in items:
            if item.done:
                continue
            if item.error is not None:
                bad += 1
                typer.echo(f"line {item.lineno}: {item.error}", err=True)
                continue
            try:
                grouper.add(parse_chunk(item.data), size=len(item.data))
            except ChunkRejected as exc:
                bad += 1
                typer.echo(f"line {item.lineno}: not a chunk: {exc}", err=True)

    stream: BinaryIO
    if source == "-":
        stream = sys.stdin.buffer
    else:
        path = Path(source)
        if not path.is_file():
            typer.echo(
                f"error: {source}: no such file; pass a JSON Lines or SSE file, or '-'", err=True
            )
            raise typer.Exit(2)
        stream = path.open("rb")
    with stream:
        while block := stream.read(_READ_SIZE):
            take(decoder.decode(block))
        take(decoder.flush())

    out = sys.stdout
    for response in grouper.finish():
        if pretty:
            out.write(response.model_dump_json(exclude_none=True, indent=2))
        else:
            out.write(response.to_json().decode())
        out.write("\n")
    out.flush()
    if bad:
        typer.echo(f"{bad} line(s) could not be assembled (see above)", err=True)
        raise typer.Exit(1)
