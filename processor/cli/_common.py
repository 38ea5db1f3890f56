"""What every command shares: settings from env + flags, one-line errors, shared options,
and tables that stay readable at 80 columns and when piped.

Exit codes (the same for the same failure in every command):
``0`` ok, ``1`` the command ran but something it did failed (bad lines, missing topics
after create), ``2`` bad input: a bad setting or option, or no broker to talk to,
``130`` interrupted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from processor.settings import Settings

__all__ = [
    "EXIT_USAGE",
    "BrokerOption",
    "Col",
    "broker_errors",
    "fail",
    "load_settings",
    "print_rows",
]

EXIT_USAGE = 2

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers, host:port[,host:port] "
        "(default: CHUNKSTITCH_BROKER, else 127.0.0.1:9092).",
    ),
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(**flags: object) -> Settings:
    """Settings from the environment with the given CLI flags on top (None = not given).

    A bad value exits 2 with one line naming the flag (``--broker``) or the variable
    (``CHUNKSTITCH_PARTITIONS``) and what to do; never a traceback.
    """
    from pydantic import ValidationError

    from processor.settings import get_settings, settings_error_message

    names = {field: "--" + field.replace("_", "-") for field, v in flags.items() if v is not None}
    try:
        return get_settings(**flags)
    except ValidationError as exc:
        fail(settings_error_message(exc, names))


def quiet_kafka_logs() -> None:
    """Commands report connection failures themselves, in one line: silence aiokafka's
    own per-attempt error lines (``Unable connect to ...``)."""
    import logging

    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Turn the broker errors of admin, readers and clients into one line and exit 2."""
    from processor.clients import ClientError
    from processor.kafka import BrokerUnreachable

    try:
        yield
    except (BrokerUnreachable, ClientError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# --- tables ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Col:
    """A column of :func:`print_rows`."""

    header: str
    justify: Literal["left", "right"] = "left"
    flex: bool = False  # takes what width is left, cut with an ellipsis (one per table)
    wrap: bool = False  # a flexible column that wraps onto more lines instead of being cut
    flex_min: int = 16  # the narrowest a flexible column may become
    drop: int = 0  # > 0: may be left out when the width is short (highest first)


_GAP = 2


def _width(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.split("\n")), default=0)


def print_rows(
    console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]], *, title: str = ""
) -> None:
    """A table that never cuts an id or a number: it fits the console width (80 when
    piped, unless ``COLUMNS`` says otherwise) by shortening the one flexible column and
    leaving out optional columns; when even that does not fit, one block per row
    (``header value`` pairs, wrapped at the width)."""
    from rich.table import Table

    width = console.width
    keep = list(range(len(cols)))
    widths = [max([_width(c.header), *(_width(r[i]) for r in rows)]) for i, c in enumerate(cols)]

    def needed(idx: list[int]) -> int:
        total = sum(min(widths[i], cols[i].flex_min) if cols[i].flex else widths[i] for i in idx)
        return total + _GAP * (len(idx) - 1)

    while needed(keep) > width and any(cols[i].drop for i in keep):
        keep.remove(max((i for i in keep if cols[i].drop), key=lambda i: cols[i].drop))
    if title:
        console.print(title, style="bold", overflow="fold", highlight=False)
    if needed(keep) <= width:
        fixed = sum(widths[i] for i in keep if not cols[i].flex) + _GAP * (len(keep) - 1)
        table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
        for i in keep:
            col = cols[i]
            table.add_column(
                col.header,
                justify=col.justify,
                no_wrap=not col.wrap,
                overflow="fold" if col.wrap or not col.flex else "ellipsis",
                width=min(widths[i], width - fixed) if col.flex else widths[i],
            )
        for row in rows:
            table.add_row(*(row[i] for i in keep))
        console.print(table, highlight=False)
        left_out = [cols[i].header for i in range(len(cols)) if i not in keep]
        if left_out:
            console.print(
                f"(left out at {width} columns: {', '.join(left_out)}; "
                "COLUMNS=N or --json shows them)",
                style="dim",
                highlight=False,
            )
        return
    # Blocks: the first column as a heading, the others as "header value" pairs.
    from rich.text import Text

    for row in rows:
        console.print(row[0], style="bold", overflow="fold", highlight=False)
        line = ""
        for i in range(1, len(cols)):
            if not row[i] or cols[i].flex:
                continue
            pair = f"{cols[i].header} {row[i]}"
            if line and _width(line) + 3 + _width(pair) > width:
                console.print(line, overflow="fold", highlight=False)
                line = ""
            line = f"{line}   {pair}" if line else f"  {pair}"
        if line:
            console.print(line, overflow="fold", highlight=False)
        for i in range(1, len(cols)):
            if cols[i].flex and row[i] and cols[i].wrap:
                for part in row[i].split("\n"):
                    console.print(Text("  " + part, overflow="fold"), highlight=False)
            elif cols[i].flex and row[i]:
                text = Text("  " + row[i], overflow="ellipsis", no_wrap=True)
                console.print(text, highlight=False, no_wrap=True, overflow="ellipsis")
