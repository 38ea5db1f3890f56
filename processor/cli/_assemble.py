"""``chunkstitch assemble``: chunks (JSON Lines or an SSE capture) in, finished responses out."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from processor.cli import app
from processor.cli._source import READ_SIZE, open_source

__all__ = ["assemble"]


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

    stream, _ = open_source(source)
    with stream:
        while block := stream.read(READ_SIZE):
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
