"""Usage recovery from checkpoints on the real broker: exact totals and exact token metrics
when the checkpoint and the committed offset disagree after kill -9 (in both directions),
and a usage publisher that cannot make its rollups durable stops the worker loudly."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from processor.broker import EmbeddedBroker
from processor.usage import load_checkpoint
from tests.helpers.worker import (
    WorkerProcess,
    isolated_settings,
    make_topics,
    produce,
    read_topic,
)
from tests.integration._streams import build_streams, wire
from tests.integration.test_usage_rollups import _usage_of
from topics import ChatCompletion, RecordMeta


def _tokens_metric(text: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("chunkstitch_tokens_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def _usage_rows(worker: WorkerProcess, want: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(60):
        rows = json.loads(worker.get("/usage?window=1d&by=tenant"))["rows"]
        if sum(r["totals"]["requests"] for r in rows) >= want:
            break
        await asyncio.sleep(0.5)
    return rows


async def test_checkpoint_ahead_of_and_behind_the_commit_after_kill_9(
    broker: str, tmp_path: Path
) -> None:
    # Each third is published after a worker (re)start, 4-5 s after the previous one: a
    # stream with chunks on both sides of that pause really was idle that long in its
    # record times, and the default 4 s idle timeout of the tests then ends it as
    # incomplete, without its usage (correctly; the tokens came out short under load).
    # Timeouts above the pause: this test is about checkpoints, not idleness.
    base = isolated_settings(broker, tmp_path, idle_timeout_s=12.0, usage_grace_s=3.0)
    await make_topics(base)
    streams = build_streams(90, seed=71, prefix="ckpt")
    records = wire(streams, seed=72)
    third = len(records) // 3

    # 1: checkpoints every 0.3 s, offsets never committed -> after kill -9 the consumer
    #    redelivers everything the checkpoint already holds
    never_commits = base.model_copy(update={"commit_interval_s": 3600.0, "rollup_interval_s": 0.3})
    worker = WorkerProcess(never_commits, tmp_path / "w1.log").start()
    try:
        await produce(base, records[:third])
        await read_topic(base, base.topic_responses, until=10, timeout_s=30)
        await asyncio.sleep(2)
    finally:
        worker.kill9()
    # 2: offsets committed every 0.3 s, no checkpoint -> after kill -9 the committed
    #    offset is ahead of the checkpoint
    never_checkpoints = base.model_copy(update={"rollup_interval_s": 3600.0})
    worker = WorkerProcess(never_checkpoints, tmp_path / "w2.log").start()
    try:
        await produce(base, records[third : 2 * third])
        await read_topic(base, base.topic_responses, until=30, timeout_s=30)
        await asyncio.sleep(2)
    finally:
        worker.kill9()
    checkpoints = {p: await load_checkpoint(base, p) for p in range(base.partitions)}
    assert any(cp is not None and cp.next_offset > 0 for cp in checkpoints.values())

    # 3: a normal worker restores from the phase-1 checkpoints and catches up
    worker = WorkerProcess(base, tmp_path / "w3.log").start()
    try:
        await produce(base, records[2 * third :])
        await read_topic(base, base.topic_responses, until=len(streams), timeout_s=90)
        rows = await _usage_rows(worker, len(streams))
        minute = json.loads(worker.get("/usage?window=1m&by=&limit=10000"))["rows"]
        metrics = worker.get("/metrics").decode()
    finally:
        worker.stop()

    expected: dict[str, Counter[str]] = {}
    for s in streams:
        prompt, completion = _usage_of(s.chunks)
        c = expected.setdefault(s.tenant, Counter())
        c["requests"] += 1
        c["prompt_tokens"] += prompt
        c["completion_tokens"] += completion
    got = {
        r["key"]["tenant"]: {
            k: r["totals"][k] for k in ("requests", "prompt_tokens", "completion_tokens")
        }
        for r in rows
    }
    assert got == {t: dict(c) for t, c in expected.items()}
    assert sum(r["totals"]["requests"] for r in minute) == len(streams)

    # Token metrics of the last process: exactly the completions it folded first, i.e.
    # the first copy of every id at or after its partition's restored checkpoint offset.
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        base.topic_responses, bootstrap_servers=broker, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: set[bytes] = set()
    tokens = 0
    try:
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            if not batch and n:
                break
            for tp, recs in batch.items():
                cp = checkpoints[tp.partition]
                for rec in sorted(recs, key=lambda r: r.offset):
                    n += 1
                    if rec.key in seen or rec.value is None:
                        continue
                    seen.add(rec.key)
                    if cp is not None and rec.offset < cp.next_offset:
                        continue
                    usage = ChatCompletion.model_validate_json(rec.value).usage
                    if usage is not None:
                        tokens += usage.prompt_tokens + usage.completion_tokens
    finally:
        await consumer.stop()
    assert len(seen) == len(streams)
    assert _tokens_metric(metrics) == tokens


async def test_a_usage_publisher_that_cannot_write_stops_the_worker_loudly(
    tmp_path: Path,
) -> None:
    """A real broker-side fault: the broker freezes (SIGSTOP) while rollups wait for their
    acknowledgement. The publisher gives up after usage_publish_timeout_s, logs one
    critical line and the worker exits non-zero (the orchestrator restarts it)."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as own:
        assert own._proc is not None
        settings = isolated_settings(
            own.bootstrap, tmp_path, rollup_interval_s=2.0, usage_publish_timeout_s=2.0
        )
        await make_topics(settings)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        assert worker.proc is not None
        try:
            for attempt in range(4):
                await produce(
                    settings,
                    [(f"r{attempt}".encode(), _response_bytes(f"r{attempt}"), RecordMeta())],
                    topic=settings.topic_responses,
                )
                for _ in range(100):  # folded, not yet published (every 2 s)
                    if f'status="complete"}} {attempt + 1}.0' in worker.get("/metrics").decode():
                        break
                    await asyncio.sleep(0.02)
                own._proc.send_signal(signal.SIGSTOP)
                try:
                    for _ in range(60):  # 12 s at most
                        if "usage publisher died" in (tmp_path / "worker.log").read_text():
                            break
                        await asyncio.sleep(0.2)
                finally:
                    own._proc.send_signal(signal.SIGCONT)
                if "usage publisher died" in (tmp_path / "worker.log").read_text():
                    break
            code = await asyncio.to_thread(worker.proc.wait, 60)
        finally:
            worker.stop()
    log = (tmp_path / "worker.log").read_text()
    critical = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"critical"' in line and "usage publisher died" in line
    ]
    assert critical, log[-3000:]
    assert "not acknowledged within 2s" in critical[0]["error"]
    assert "orchestrator restarts it" in critical[0]["event"]
    assert code != 0


def _response_bytes(cid: str) -> bytes:
    import random

    from processor.core import assemble_many, parse_chunk
    from processor.synthetic import make_stream

    chunks = make_stream("openai-text", cid, random.Random(1)).chunks
    resp = assemble_many(parse_chunk(c) for c in chunks)[0]
    meta = resp.chunkstitch.model_copy(
        update={"tenant": "acme", "request_started_at_ms": int(time.time() * 1000)}
    )
    return resp.model_copy(update={"chunkstitch": meta}).to_json()


async def test_recovery_of_a_long_backlog_publishes_as_it_folds(
    broker: str, tmp_path: Path
) -> None:
    """A backlog spanning many windows is published every rollup interval while the
    recovery folds it, not all at its end: the state holds the windows still open, not
    every window of the backlog (the soak's worker held 125 MB of closed buckets)."""
    from aiokafka import AIOKafkaProducer

    from tests.unit.test_usage_state import response
    from topics import UsageRollup

    settings = isolated_settings(broker, tmp_path, partitions=1, rollup_interval_s=0.05)
    await make_topics(settings)
    n = 8000
    t0 = (int(time.time() * 1000) // 60_000 - n - 10) * 60_000
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=20)
    await producer.start()
    try:  # one completion a minute of event time: n minute windows, all but a few closed
        sent = [
            await producer.send(
                settings.topic_responses,
                response(f"bk-{i:05d}", t0 + i * 60_000),
                key=f"bk-{i:05d}".encode(),
                partition=0,
            )
            for i in range(n)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    worker = WorkerProcess(settings, tmp_path / "w.log").start()
    try:
        records = await read_topic(
            settings, settings.topic_rollups, until=n - 10, timeout_s=90, distinct_keys=True
        )
    finally:
        worker.stop()
    finals = [
        r
        for r in (UsageRollup.model_validate_json(v) for _, v in records)
        if r.final and r.key.window_ms == 60_000
    ]
    assert len(finals) >= n - 10
    assert sum(r.totals.requests for r in finals) == len({r.key for r in finals})
    # drained in several turns while folding (one drain after the read: one as_of_offset)
    assert len({r.as_of_offset for r in finals}) > 1
