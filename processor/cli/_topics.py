"""``chunkstitch topics create | list``: topics as code."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from processor.cli import app
from processor.cli._common import (
    BrokerOption,
    Col,
    broker_errors,
    fail,
    load_settings,
    print_rows,
    quiet_kafka_logs,
)

__all__ = ["topics_app"]

topics_app = typer.Typer(
    help="Create and inspect chunkstitch's topics (defined in topics/).", no_args_is_help=True
)
app.add_typer(topics_app, name="topics")

COLUMNS = (
    Col("topic"),
    Col("role", drop=1),
    Col("partitions", justify="right"),
    Col("state"),
    Col("configs", flex=True, wrap=True, flex_min=24),
)


def _state(st: Any) -> str:
    return "created" if st.created else ("exists" if st.exists else "MISSING")


def _print(states: list[Any], settings: Any, as_json: bool) -> None:
    if as_json:
        for st in states:
            typer.echo(
                json.dumps(
                    {
                        "topic": st.spec.name,
                        "role": st.spec.role,
                        "partitions": st.partitions or st.spec.partitions,
                        "state": _state(st).lower(),
                        "exists": st.exists,
                        "configs": dict(st.spec.configs),
                    }
                )
            )
        return
    from rich.console import Console

    rows = [
        [
            st.spec.name,
            st.spec.role,
            str(st.partitions or st.spec.partitions),
            _state(st),
            "\n".join(f"{k}={v}" for k, v in st.spec.configs.items()),
        ]
        for st in states
    ]
    print_rows(Console(), COLUMNS, rows, title=f"chunkstitch topics on {settings.broker}")


def _show(action: str, broker: str | None, as_json: bool) -> list[Any]:
    """Run ``create_topics`` or ``describe_topics``, print the result, return the states."""
    from processor import admin

    settings = load_settings(broker=broker)
    quiet_kafka_logs()
    fetch = admin.create_topics if action == "create" else admin.describe_topics
    with broker_errors():
        states = asyncio.run(fetch(settings))
    _print(states, settings, as_json)
    return states


JsonOption = Annotated[
    bool, typer.Option("--json", help="One JSON object per topic and line instead of a table.")
]


@topics_app.command("create")
def create(broker: BrokerOption = None, as_json: JsonOption = False) -> None:
    """Create every missing topic with its configs (idempotent)."""
    if not all(s.exists for s in _show("create", broker, as_json)):
        fail("some topics could not be created; see the table above", code=1)


@topics_app.command("list")
def list_(broker: BrokerOption = None, as_json: JsonOption = False) -> None:
    """Show chunkstitch's topics: partitions, configs, and whether they exist."""
    if not all(s.exists for s in _show("list", broker, as_json)):
        typer.echo("some topics are missing: run `chunkstitch topics create`", err=True)


@topics_app.command("manifest")
def manifest(
    replicas: Annotated[
        int, typer.Option(min=1, metavar="N", help="Replication factor in production.")
    ] = 3,
    min_insync: Annotated[int, typer.Option(min=1, metavar="N", help="min.insync.replicas.")] = 2,
    cluster: Annotated[
        str, typer.Option(metavar="NAME", help="Strimzi Kafka cluster name.")
    ] = "chunkstitch",
    output: Annotated[
        str | None, typer.Option("-o", "--output", metavar="FILE", help="Write to this file.")
    ] = None,
) -> None:
    """Print Strimzi KafkaTopic resources for every topic (generated from topics/)."""
    from pathlib import Path

    try:
        from processor.manifests import render_manifest
    except ModuleNotFoundError as exc:
        if exc.name != "yaml":
            raise
        fail("rendering manifests needs PyYAML: pip install 'chunkstitch[manifests]'")
    settings = load_settings()
    try:
        text = render_manifest(settings, cluster=cluster, replicas=replicas, min_insync=min_insync)
    except ValueError as exc:
        fail(str(exc))
    if output:
        Path(output).write_text(text)
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text, nl=False)
