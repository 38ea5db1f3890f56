"""The ``chunkstitch`` command line (typer).

Each command lives in its own private module and registers itself on :data:`app`;
this module only imports them. Keep imports inside command functions cheap: heavy
modules (faust, aiokafka) are imported lazily so ``chunkstitch assemble`` starts fast.
Shared options, settings loading, one-line errors and exit codes: ``_common.py``.
"""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="chunkstitch",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags shown as flags, readable at 80 columns and piped
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"chunkstitch {version('chunkstitch')}")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree
            typer.echo("chunkstitch (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """chunkstitch: reassemble streamed LLM chunks on Kafka into finished responses.

    Settings come from CHUNKSTITCH_* environment variables; flags override them. Exit
    codes: 0 ok, 1 something the command did failed, 2 bad input or no broker, 130
    interrupted.
    """


# Command modules register themselves on `app` when imported (one import per module).
from processor.cli import (  # noqa: E402
    _assemble,  # noqa: F401
    _broker,  # noqa: F401
    _consume,  # noqa: F401
    _demo,  # noqa: F401
    _publish,  # noqa: F401
    _topics,  # noqa: F401
    _usage,  # noqa: F401
    _usage_sink,  # noqa: F401  (after _usage: turns `usage` into a group with `sink`)
    _worker,  # noqa: F401
)


def main() -> None:
    """Console-script entry point: usage errors (an unknown option, a value out of range)
    are one ``error:`` line and exit code 2, like every other bad input."""
    import sys

    try:  # typer >= 0.2x vendors click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer on click
        from click import exceptions as click  # type: ignore[no-redef]

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        code = 2
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "chunkstitch"
        message = " ".join(exc.format_message().split())
        typer.echo(f"error: {where}: {message} (see {where} -h)", err=True)
        code = 2
    except click.ClickException as exc:
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        code = exc.exit_code
    except typer.Abort:
        typer.echo("", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
