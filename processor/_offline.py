"""The work of ``chunkstitch assemble``, without the CLI framework.

``processor/cli/_assemble.py`` (the typer command) and the console-script entry point's
fast path (``processor/_entry.py``) both call :func:`assemble`; neither the command nor
this module imports typer, the other commands or a Kafka client, so an offline assembly
of a large capture pays only for pydantic, the two schemas it uses and the core.

Exit codes: 0 done; 1 some lines were not chunks (reported with their line number, the
rest is assembled) or no chunk at all; 2 the input cannot be read (no such file, a
directory, no argument on a terminal).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

if TYPE_CHECKING:
    from processor.core._decode import Chunk, Payload
    from topics import ChatCompletion

__all__ = ["READ_SIZE", "AssembleExit", "assemble", "exit_now"]

READ_SIZE = 64 * 1024


class AssembleExit(Exception):
    """End the command with this exit code (the message was already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _error(message: str) -> None:
    sys.stderr.write(message + "\n")


def assemble(source: str | None, *, pretty: bool = False, single: bool = False) -> int:
    """Assemble ``source`` ('-' or None = stdin) to stdout; returns the exit code.

    Raises :class:`AssembleExit` for an input that cannot be read.
    """
    name = _check_source(source)
    # A short-lived batch job: the garbage collector would walk every object allocated so
    # far, over and over, for nothing (the merge state holds no reference cycles).
    gc.freeze()
    gc.disable()
    try:
        bad, responses = _run(name, single)
    finally:
        gc.enable()
        gc.unfreeze()
    if not responses:
        where = "stdin" if name == "-" else name
        detail = f"{bad} line(s) could not be assembled (see above)" if bad else "empty input"
        _error(
            f"error: no chunks in {where} ({detail}); pass a JSON Lines file or an SSE "
            "capture of chat.completion.chunk objects"
        )
        return 1
    _write(responses, pretty)
    if bad:
        _error(f"{bad} line(s) could not be assembled (see above)")
        return 1
    return 0


def _check_source(source: str | None) -> str:
    """The source to read. A directory, a missing file, or no argument on a terminal
    (reading a terminal would wait silently for input) end with code 2 and what to pass."""
    if source is None:
        if sys.stdin.isatty():
            _error(
                "error: no input: pass a JSON Lines file or SSE capture "
                "(chunkstitch assemble FILE), or pipe one in (... | chunkstitch assemble)"
            )
            raise AssembleExit(2)
        return "-"
    if source != "-":
        path = Path(source)
        if path.is_dir():
            _error(f"error: {source} is a directory; pass a JSON Lines file or SSE capture in it")
            raise AssembleExit(2)
        if not path.is_file():
            _error(f"error: {source}: no such file; pass a JSON Lines or SSE file, or '-'")
            raise AssembleExit(2)
    return source


def _open(source: str) -> BinaryIO:
    if source == "-":
        return sys.stdin.buffer
    return Path(source).open("rb")


def _run(source: str, single: bool) -> tuple[int, list[ChatCompletion]]:
    from processor.core import ChunkLineDecoder, ChunkRejected, StreamGrouper, parse_chunk

    grouper = StreamGrouper(single=single)
    decoder = ChunkLineDecoder()
    add = grouper.add
    bad = 0

    def take(items: list[Chunk | Payload]) -> None:
        nonlocal bad
        for item in items:
            if isinstance(item, tuple):  # a chunk line: (lineno, JSON)
                data = item[1]
                try:
                    add(parse_chunk(data), size=len(data))
                except ChunkRejected as exc:
                    bad += 1
                    _error(f"line {item[0]}: not a chunk: {exc}")
            elif item.error is not None:
                bad += 1
                _error(f"line {item.lineno}: {item.error}")
            # else: [DONE]

    stream = _open(source)
    with stream:
        while block := stream.read(READ_SIZE):
            take(decoder.decode_chunks(block))
        take(decoder.flush_chunks())
    return bad, grouper.finish()


def _write(responses: list[ChatCompletion], pretty: bool) -> None:
    if pretty:
        sys.stdout.write(
            "".join(r.model_dump_json(exclude_none=True, indent=2) + "\n" for r in responses)
        )
        sys.stdout.flush()
        return
    body = b"\n".join([r.to_json() for r in responses]) + b"\n"
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream (some test runners)
        sys.stdout.write(body.decode())
    else:
        sys.stdout.flush()
        out.write(body)
        out.flush()


def exit_now(code: int) -> None:
    """End the ``chunkstitch`` process at once with ``code``, if this is that process.

    The output is written and flushed and the input closed, so the interpreter's teardown
    (freeing every object of a large capture one by one, ~50 ms for 120,000 chunks) does
    nothing useful. Only when this is the chunkstitch process itself with its own
    stdout/stderr (not ``app()`` called inside another program or a test runner); returns
    otherwise, and the caller exits normally.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    ours = (spec is not None and spec.name == "processor.__main__") or (
        Path(sys.argv[0]).name == "chunkstitch"
    )
    streams: list[TextIO] = [sys.stdout, sys.stderr]
    own: list[object] = [sys.__stdout__, sys.__stderr__]
    if not ours or any(a is not b for a, b in zip(streams, own, strict=True)):
        return
    try:
        for stream in streams:
            stream.flush()
    except (OSError, AttributeError):  # a closed pipe: let the normal exit report it
        return
    os._exit(code)
