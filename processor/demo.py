"""``chunkstitch demo``: the whole pipeline on the embedded broker, in under a minute.

Starts the embedded broker on a free port, creates the topics, starts a real worker
process, plays a synthetic gateway (every provider shape, n>1, tool calls, reasoning,
a mid-stream error, a cut-off stream, an aborted stream, a duplicate and a malformed
record) through the publisher library, then prints the finished completions and the
dead letters, and shuts everything down.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from processor.broker import EmbeddedBroker, free_port
from processor.settings import Settings, get_settings
from processor.synthetic import PROVIDERS, SyntheticStream, make_stream

__all__ = ["DemoResult", "run_demo"]

console = Console(stderr=False)


@dataclass
class DemoResult:
    responses: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    expected_ids: set[str]


class _Aborted(Exception):
    """The demo gateway's own failure in the middle of a stream."""


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("ready"))
    except Exception:
        return False


def _streams(rng: random.Random) -> list[SyntheticStream]:
    kinds = sorted(PROVIDERS)
    out = [make_stream(kind, f"demo-{i:02d}-{kind}", rng) for i, kind in enumerate(kinds)]
    out += [
        make_stream("openai-text", f"demo-{i:02d}-openai-text", rng) for i in range(len(kinds), 39)
    ]
    out.append(make_stream("openai-text", "demo-39-aborted", rng))  # the gateway fails mid-way
    return out


async def _play(settings: Settings, streams: list[SyntheticStream], progress: Progress) -> int:
    """Publish every stream concurrently, like a gateway serving them at once."""
    from aiokafka import AIOKafkaProducer

    from processor.clients import Publisher

    total = sum(len(s.chunks) for s in streams)
    task = progress.add_task("gateway: publishing chunks", total=total)
    aborted_id = streams[-1].completion_id
    duplicated_id = next(s.completion_id for s in streams if s.provider == "openai")
    raw = AIOKafkaProducer(bootstrap_servers=settings.broker)
    await raw.start()

    async def one(pub: Publisher, stream: SyntheticStream, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with pub.stream(
                tenant=stream.tenant, provider=stream.provider, request_started_at=time.time()
            ) as handle:
                for i, chunk in enumerate(stream.chunks):
                    if stream.completion_id == aborted_id and i == 3:
                        raise _Aborted  # the gateway's client hung up mid-stream
                    await handle.send(chunk)
                    progress.advance(task)
                    if stream.completion_id == duplicated_id and i == 2:
                        # A retrying gateway sends chunk 1 again: same key, same cs-seq.
                        await raw.send_and_wait(
                            settings.topic_chunks,
                            json.dumps(stream.chunks[1]).encode(),
                            key=stream.completion_id.encode(),
                            headers=[("cs-seq", b"1")],
                        )
                    await asyncio.sleep(0.002)
                if stream.expect_status != "incomplete":
                    handle.mark_done()
        except _Aborted:
            progress.advance(task, len(stream.chunks) - 3)

    try:
        async with Publisher(settings) as pub:
            await asyncio.gather(*(one(pub, s, i * 0.01) for i, s in enumerate(streams)))
        # Real traffic is messy: a proxy error page lands on the chunk topic.
        await raw.send_and_wait(
            settings.topic_chunks, b"<html>502 Bad Gateway</html>", key=b"demo-malformed"
        )
    finally:
        await raw.stop()
    return total


async def _collect(settings: Settings, expected: set[str], progress: Progress) -> DemoResult:
    from processor.kafka import read_to_end

    task = progress.add_task("worker: finished completions", total=len(expected))
    responses: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 40
    from aiokafka import TopicPartition

    tps = [TopicPartition(settings.topic_responses, p) for p in range(settings.partitions)]
    while time.monotonic() < deadline and not expected <= responses.keys():
        for rec in await read_to_end(settings, tps):
            body = json.loads(rec.value)
            responses[body["id"]] = body
        progress.update(task, completed=len(expected & responses.keys()))
        await asyncio.sleep(0.5)
    dlq = [TopicPartition(settings.topic_deadletter, p) for p in range(settings.partitions)]
    letters = [json.loads(r.value) for r in await read_to_end(settings, dlq)]
    return DemoResult(sorted(responses.values(), key=lambda r: r["id"]), letters, expected)


def _print(result: DemoResult) -> None:
    from processor.cli._common import Col, print_rows

    cols = (
        Col("completion"),
        Col("provider", drop=1),
        Col("status"),
        Col("chunks", justify="right"),
        Col("tokens", justify="right"),
        Col("text", flex=True, flex_min=12),
    )
    rows = []
    for r in result.responses:
        meta = r["chunkstitch"]
        choice = r["choices"][0] if r["choices"] else {"message": {}}
        msg = choice["message"]
        text = msg.get("content") or ""
        if msg.get("tool_calls"):
            text = "tool: " + ", ".join(c["function"]["name"] or "?" for c in msg["tool_calls"])
        if len(r["choices"]) > 1:
            text = f"[{len(r['choices'])} choices] " + text
        usage = r.get("usage") or {}
        rows.append(
            [
                r["id"].removeprefix("demo-"),
                meta.get("provider") or "",
                meta["status"],
                f"{meta['chunk_count']}"
                + (f" +{meta['duplicates_dropped']}dup" if meta["duplicates_dropped"] else ""),
                str(usage.get("total_tokens", "-")),
                " ".join(text.split()),
            ]
        )
    print_rows(console, cols, rows, title="finished completions (topic chunkstitch.responses)")
    by_status: dict[str, int] = {}
    for r in result.responses:
        by_status[r["chunkstitch"]["status"]] = by_status.get(r["chunkstitch"]["status"], 0) + 1
    console.print(
        f"{len(result.responses)} of {len(result.expected_ids)} completions finished: "
        + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
    )
    dups = sum(r["chunkstitch"]["duplicates_dropped"] for r in result.responses)
    console.print(f"duplicate chunks dropped: {dups}")
    console.print(f"dead letters: {len(result.dead_letters)}")
    for letter in result.dead_letters:
        console.print(f"  - {letter['reason']}: {letter['message']}")


def run_demo(keep_logs: bool = False) -> DemoResult:
    """Run the demo end to end; returns what it printed (for tests).

    Its broker and worker logs live in a temporary folder that is removed at the end,
    unless ``keep_logs`` is set or the demo failed (then the folder is named)."""
    workdir = Path(tempfile.mkdtemp(prefix="chunkstitch-demo-"))
    ok = False
    try:
        result = _run_demo(workdir)
        ok = {r["id"] for r in result.responses} == result.expected_ids
        return result
    finally:
        if keep_logs or not ok:
            console.print(f"broker and worker logs kept in {workdir}", highlight=False)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(workdir: Path) -> DemoResult:
    started = time.monotonic()
    broker = EmbeddedBroker(log_path=workdir / "broker.log")
    web_port = free_port()
    worker: subprocess.Popen[bytes] | None = None
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    ) as progress:
        try:
            step = progress.add_task(f"embedded broker on 127.0.0.1:{broker.port}", total=1)
            broker.start()
            progress.update(step, completed=1)
            settings = get_settings(
                broker=broker.bootstrap,
                app_id="chunkstitch-demo",
                partitions=4,
                session_timeout_s=3,
                heartbeat_interval_s=0.5,
                idle_timeout_s=4,
                usage_grace_s=0.5,
                web_port=web_port,
                usage_port=free_port(),
                data_dir=str(workdir / "data"),
                log_level="WARNING",
            )
            step = progress.add_task("topics created (chunkstitch topics create)", total=1)
            from processor.admin import create_topics

            asyncio.run(create_topics(settings))
            progress.update(step, completed=1)
            step = progress.add_task(f"worker starting (web on :{web_port})", total=1)
            log = (workdir / "worker.log").open("wb")
            worker = subprocess.Popen(
                [sys.executable, "-m", "processor", "worker"],
                env={**os.environ, **settings.to_env()},
                stdout=log,
                stderr=log,
            )
            deadline = time.monotonic() + 45
            while not _ready(web_port):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the worker did not become ready; its log is {workdir / 'worker.log'}"
                    )
                time.sleep(0.2)
            progress.update(step, completed=1)
            streams = _streams(random.Random(2026))

            async def play_and_collect() -> DemoResult:
                await _play(settings, streams, progress)
                return await _collect(settings, {s.completion_id for s in streams}, progress)

            result = asyncio.run(play_and_collect())
        finally:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    worker.kill()
            broker.stop()
    _print(result)
    console.print(f"done in {time.monotonic() - started:.1f}s; broker and worker stopped")
    return result
