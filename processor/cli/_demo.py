"""``chunkstitch demo``: the whole pipeline on the embedded broker."""

from __future__ import annotations

import typer

from processor.cli import app

__all__ = ["demo"]


@app.command()
def demo() -> None:
    """Run the demo: embedded broker, topics, a worker, a synthetic gateway, results."""
    from processor.demo import run_demo

    result = run_demo()
    if {r["id"] for r in result.responses} != result.expected_ids:
        typer.echo("error: some completions did not finish; see the worker log above", err=True)
        raise typer.Exit(1)
