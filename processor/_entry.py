"""The ``chunkstitch`` console script.

A plain ``chunkstitch assemble [--pretty] [--single|--one-stream] [FILE|-]`` runs the
offline assembler (:mod:`processor._offline`) directly: importing typer, its click and
the other commands' modules would be about a seventh of the CPU time of assembling a
120,000-chunk capture. Every other command line, including anything this fast path does
not recognise (``--help``, a typo, an unknown option), goes to the typer app, which
runs the very same assembler for ``assemble``.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_FLAGS = {"--pretty": "pretty", "--single": "single", "--one-stream": "single"}


def _plain_assemble(args: list[str]) -> tuple[str | None, bool, bool] | None:
    """(source, pretty, single) when ``args`` is a plain assemble command line."""
    if not args or args[0] != "assemble":
        return None
    source: str | None = None
    seen = {"pretty": False, "single": False}
    for arg in args[1:]:
        if arg in _FLAGS:
            seen[_FLAGS[arg]] = True
        elif source is None and (arg == "-" or not arg.startswith("-")):
            source = arg
        else:
            return None  # let typer explain it
    return source, seen["pretty"], seen["single"]


def main() -> None:
    """Console-script entry point."""
    plain = _plain_assemble(sys.argv[1:])
    if plain is None:
        from processor.cli import main as cli_main

        cli_main()
        return
    from processor import _offline

    source, pretty, single = plain
    try:
        code = _offline.assemble(source, pretty=pretty, single=single)
    except _offline.AssembleExit as exc:
        code = exc.code
    _offline.exit_now(code)
    sys.exit(code)
