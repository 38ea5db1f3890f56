"""``chunkstitch publish``: publish a chunk capture (JSON Lines or SSE) with the record contract."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from typing import Annotated, Any, BinaryIO

import typer

from processor.cli import app
from processor.cli._common import BrokerOption, broker_errors, fail, load_settings, quiet_kafka_logs
from processor.cli._source import READ_SIZE, open_source

__all__ = ["publish"]


@app.command()
def publish(
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE", help="A JSON Lines file or raw SSE capture; '-' reads stdin."
        ),
    ] = "-",
    tenant: Annotated[
        str | None, typer.Option(metavar="TENANT", help="Tenant header of every stream.")
    ] = None,
    provider: Annotated[
        str | None, typer.Option(metavar="PROVIDER", help="Provider header of every stream.")
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(metavar="USER", help="End-user header (cs-user) of every stream."),
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=VALUE",
            help="An attribute header (cs-attr-NAME) of every stream; repeatable. The worker "
            "keeps the names in CHUNKSTITCH_USAGE_ATTRIBUTES.",
        ),
    ] = None,
    keep_ids: Annotated[
        bool,
        typer.Option(
            "--keep-ids",
            help="Publish the capture's completion ids as they are (default: a fresh id per "
            "run, so publishing a capture twice gives two completions, not late chunks).",
        ),
    ] = False,
    topic: Annotated[
        str | None,
        typer.Option(
            metavar="TOPIC",
            help="Chunk topic to publish to (default: CHUNKSTITCH_TOPIC_CHUNKS, "
            "else chunkstitch.chunks).",
        ),
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Publish a chunk capture to the chunk topic, one stream per completion id.

    Interleaved completions are grouped by id; every chunk gets its sequence number and
    every stream an end-of-stream marker ('done' after 'data: [DONE]', else 'closed').

    Each run gives every stream a fresh completion id: the capture's id plus a suffix
    of this run ('chatcmpl-abc' becomes 'chatcmpl-abc-r1a2b3c'), so a capture can be
    published again and again. The worker remembers finished ids, so publishing the same
    ids twice (--keep-ids) turns the second run into late_chunk dead letters.

    Bad lines are reported with their line number and not published; the exit code is
    then 1.
    """
    from processor.logs import configure_logging

    settings = load_settings(broker=broker, topic_chunks=topic)
    labels = _labels(user, attr or [])
    if source == "-" and sys.stdin.isatty():
        fail(
            "publish reads a chunk capture (JSON Lines or SSE): pass a FILE, or pipe one "
            "in with '-', e.g. chunkstitch publish examples/capture.sse"
        )
    configure_logging(settings.log_level, settings.log_format)  # logs go to stderr
    quiet_kafka_logs()
    stream, total = open_source(source)
    suffix = None if keep_ids else "-r" + secrets.token_hex(3)
    with broker_errors(), stream:
        chunks, streams, bad = asyncio.run(
            _run(
                settings,
                stream,
                total,
                tenant=tenant,
                provider=provider,
                suffix=suffix,
                **labels,
            )
        )
    typer.echo(
        f"sent {chunks} chunk(s) in {streams} stream(s) to topic "
        f"{settings.topic_chunks!r} at {settings.broker}"
        + (f" (completion ids end in {suffix!r}; --keep-ids keeps the capture's)" if suffix else "")
    )
    if bad:
        typer.echo(f"{bad} line(s) were not chunks and were not published (see above)", err=True)
        raise typer.Exit(1)


def _labels(user: str | None, attrs: list[str]) -> dict[str, Any]:
    """``--user`` and ``--attr NAME=VALUE`` checked as the publisher checks them (a bad
    one ends the command with a one-line error before anything is published)."""
    from processor.clients._publisher import stream_headers

    attributes: dict[str, str] = {}
    for item in attrs:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"--attr {item!r}: use NAME=VALUE, e.g. --attr feature=search")
        attributes[name.strip()] = value
    try:
        stream_headers(
            tenant=None, provider=None, request_started_at=None, user=user, attributes=attributes
        )
    except ValueError as exc:
        fail(f"--user/--attr: {exc}")
    return {"user": user, "attributes": attributes or None}


async def _run(
    settings: Any,
    stream: BinaryIO,
    total: int | None,
    *,
    tenant: str | None,
    provider: str | None,
    suffix: str | None = None,
    user: str | None = None,
    attributes: dict[str, str] | None = None,
) -> tuple[int, int, int]:
    import time

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from processor.clients import Publisher, StreamHandle
    from processor.core import ChunkLineDecoder, Payload

    decoder = ChunkLineDecoder()
    handles: dict[str, StreamHandle] = {}
    held: list[bytes] = []
    last: StreamHandle | None = None
    bad = 0
    started = time.time()

    async with Publisher(settings) as publisher:

        async def take(items: list[Payload]) -> None:
            nonlocal bad, last
            for item in items:
                if item.done:
                    if last is not None:
                        last.mark_done()
                    continue
                if item.error is not None:
                    bad += 1
                    typer.echo(f"line {item.lineno}: {item.error}", err=True)
                    continue
                try:
                    obj = json.loads(item.data)
                except ValueError as exc:
                    bad += 1
                    typer.echo(f"line {item.lineno}: not valid JSON: {exc}", err=True)
                    continue
                cid = obj.get("id") if isinstance(obj, dict) else None
                if not isinstance(cid, str) or not cid:
                    held.append(item.data)  # e.g. Azure's placeholder: precedes its completion
                    continue
                value = item.data
                if suffix is not None:  # a fresh id for this run (see --keep-ids)
                    obj["id"] = cid + suffix
                    value = json.dumps(obj, ensure_ascii=False).encode()
                handle = handles.get(cid)
                if handle is None:
                    handle = handles[cid] = publisher.stream(
                        tenant=tenant,
                        provider=provider,
                        request_started_at=started,
                        completion_id=cid + (suffix or ""),
                        user=user,
                        attributes=attributes,
                    )
                    for early in held:
                        await handle.send(early)
                    held.clear()
                last = handle
                await handle.send(value)

        progress = Progress(
            TextColumn("publishing"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[chunks]} chunks"),
            transient=True,
            disable=total is None or not sys.stderr.isatty(),
            console=Console(stderr=True),
        )
        with progress:
            task = progress.add_task("publish", total=total, chunks=0)
            while block := stream.read(READ_SIZE):
                await take(decoder.decode(block))
                progress.update(task, advance=len(block), chunks=publisher.stats.chunks)
            await take(decoder.flush())
        if held:  # id-less chunks after the last completion started: they belong to it
            target = last or publisher.stream(
                tenant=tenant, provider=provider, user=user, attributes=attributes
            )
            for value in held:
                await target.send(value)
            if last is None:
                await target.close()
        for handle in handles.values():
            await handle.close()
        await publisher.flush()
        return publisher.stats.chunks, len(handles), bad
