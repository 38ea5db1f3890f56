"""``chunkstitch topics create | list``: topics as code."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from processor.cli import app

__all__ = ["topics_app"]

topics_app = typer.Typer(help="Create and inspect chunkstitch's topics (defined in topics/).")
app.add_typer(topics_app, name="topics")

Broker = Annotated[str | None, typer.Option(help="Kafka bootstrap host:port (CHUNKSTITCH_BROKER).")]


def _table(states: list, title: str) -> None:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("topic", "role", "partitions", "state", "configs"):
        table.add_column(column)
    for st in states:
        state = "created" if st.created else ("exists" if st.exists else "MISSING")
        configs = ", ".join(f"{k}={v}" for k, v in st.spec.configs.items())
        table.add_row(
            st.spec.name, st.spec.role, str(st.partitions or st.spec.partitions), state, configs
        )
    Console().print(table)


def _show(action: str, broker: str | None) -> list:  # type: ignore[type-arg]
    """Run ``create_topics`` or ``describe_topics``, print the table, return the states."""
    from processor import admin
    from processor.kafka import BrokerUnreachable
    from processor.settings import get_settings

    settings = get_settings(broker=broker)
    fetch = admin.create_topics if action == "create" else admin.describe_topics
    try:
        states = asyncio.run(fetch(settings))
    except BrokerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _table(states, f"chunkstitch topics on {settings.broker}")
    return states


@topics_app.command("create")
def create(broker: Broker = None) -> None:
    """Create every missing topic with its configs (idempotent)."""
    if not all(s.exists for s in _show("create", broker)):
        typer.echo("error: some topics could not be created; see the table above", err=True)
        raise typer.Exit(1)


@topics_app.command("list")
def list_(broker: Broker = None) -> None:
    """Show chunkstitch's topics: partitions, configs, and whether they exist."""
    if not all(s.exists for s in _show("list", broker)):
        typer.echo("some topics are missing: run `chunkstitch topics create`", err=True)


@topics_app.command("manifest")
def manifest(
    replicas: Annotated[int, typer.Option(help="Replication factor in production.")] = 3,
    min_insync: Annotated[int, typer.Option(help="min.insync.replicas.")] = 2,
    cluster: Annotated[str, typer.Option(help="Strimzi Kafka cluster name.")] = "chunkstitch",
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="Write to this file.")
    ] = None,
) -> None:
    """Print Strimzi KafkaTopic resources for every topic (generated from topics/)."""
    from pathlib import Path

    from processor.manifests import render_manifest
    from processor.settings import get_settings

    try:
        text = render_manifest(
            get_settings(), cluster=cluster, replicas=replicas, min_insync=min_insync
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if output:
        Path(output).write_text(text)
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text, nl=False)
