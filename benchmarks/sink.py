"""The usage sink into PostgreSQL, next to bare COPY and executemany of the same rows.

One run, one PostgreSQL server (``--dsn`` or ``CHUNKSTITCH_TEST_POSTGRES_DSN``; the role
must be allowed to CREATE DATABASE: each variant gets a fresh database), one embedded
broker on 127.0.0.1. The same ``--records`` rollup records (``--keys`` buckets, each
updated several times, interleaved) go through:

* (a) bare ``COPY`` of the rows into a plain table (no key, no conflict handling): the
  floor of any writer;
* (b) bare ``executemany`` of a plain ``INSERT`` of the same rows;
* (c) the sink's upsert alone (``processor.usage._pg.upsert``: COPY into a staging table,
  ``INSERT .. ON CONFLICT`` keeping the later offset), batches of ``--batch`` rows;
* (d) the whole sink (``UsageSink``): fetch from the rollup topic, validate each record,
  upsert, commit offsets; timed from its first fetched record until the table holds the
  final totals of every key.

Rows (records) per second for each, and the ratios to (a). Then what the sink has to keep
up with: (e) a real worker at full speed on the same kind of broker, fed ``--streams``
completions preloaded on the chunk topic (every synthetic provider shape, 50 tenants,
request times spread over 10 minutes): the rollup records it publishes per second while
it works through them, and the margin (d) / (e).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from processor.admin import create_topics
from processor.broker import EmbeddedBroker
from processor.core import result
from processor.settings import Settings
from processor.usage._pg import COLUMNS, TABLE, Row, migrate, row_of, upsert
from topics import UsageKey, UsageRollup, UsageTotals

T0 = 1_760_000_000_000 // 86_400_000 * 86_400_000


def rollups(keys: int, records: int, seed: int = 1) -> list[UsageRollup]:
    """``records`` rollup records over ``keys`` buckets; each key's totals grow in order."""
    rng = random.Random(seed)
    steps = [0] * keys
    out = []
    for _ in range(records):
        i = rng.randrange(keys)
        steps[i] += 1
        step = steps[i]
        key = UsageKey(
            window_start_ms=T0 + (i // 40) * 60_000,
            window_ms=60_000,
            tenant=f"tenant-{i % 40}",
            model=f"model-{i % 7}",
            provider="openai",
            status="complete",
        )
        buckets = [0] * 14
        buckets[i % 14] = step
        totals = UsageTotals(
            requests=step,
            complete=step,
            prompt_tokens=120 * step,
            completion_tokens=30 * step,
            total_tokens=150 * step,
            cost_nano_usd=900 * step,
            with_cost=step,
            ttfc_ms_buckets=tuple(buckets),
            duration_ms_buckets=tuple(buckets),
            rate_tokens=30 * step,
            rate_duration_ms=400 * step,
        )
        out.append(result(key, totals, i % 6))
    return out


def _with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_db(dsn: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(dsn)
    name = f"cs_bench_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_db(dsn, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def _plain_ddl() -> str:
    types = []
    for c in COLUMNS:
        if c.endswith("_buckets"):
            types.append(f"{c} bigint[]")
        elif c in ("tenant", "model", "provider", "status"):
            types.append(f"{c} text")
        elif c in ("late", "final"):
            types.append(f"{c} boolean")
        else:
            types.append(f"{c} bigint")
    return f"CREATE TABLE plain ({', '.join(types)})"


def _batches(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def bare_copy(dsn: str, rows: list[Row], batch: int) -> float:
    async with fresh_db(dsn) as db:
        conn = await asyncpg.connect(db)
        await conn.execute(_plain_ddl())
        start = time.perf_counter()
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.copy_records_to_table("plain", records=part, columns=list(COLUMNS))
        elapsed = time.perf_counter() - start
        await conn.close()
    return len(rows) / elapsed


async def bare_executemany(dsn: str, rows: list[Row], batch: int) -> float:
    async with fresh_db(dsn) as db:
        conn = await asyncpg.connect(db)
        await conn.execute(_plain_ddl())
        marks = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        sql = f"INSERT INTO plain ({', '.join(COLUMNS)}) VALUES ({marks})"
        start = time.perf_counter()
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.executemany(sql, part)
        elapsed = time.perf_counter() - start
        await conn.close()
    return len(rows) / elapsed


async def upsert_only(dsn: str, rows: list[Row], batch: int) -> float:
    async with fresh_db(dsn) as db:
        conn = await asyncpg.connect(db)
        await migrate(conn)
        start = time.perf_counter()
        for part in _batches(rows, batch):
            await upsert(conn, part)
        elapsed = time.perf_counter() - start
        await conn.close()
    return len(rows) / elapsed


async def whole_sink(
    dsn: str, bootstrap: str, records: list[UsageRollup], batch: int, expected_requests: int
) -> float:
    from aiokafka import AIOKafkaProducer

    from processor.usage import _sink

    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        broker=bootstrap,
        topic_chunks=f"b{tag}.chunks",
        topic_responses=f"b{tag}.responses",
        topic_rollups=f"b{tag}.rollups",
        topic_deadletter=f"b{tag}.deadletter",
        topic_ledger=f"b{tag}.ledger",
        usage_sink_group=f"bench-{tag}",
        usage_sink_batch_max=batch,
        log_level="WARNING",
    )
    await create_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.topic_rollups,
                r.model_dump_json().encode(),
                key=r.key.record_key(r.source_partition).encode(),
            )
            for r in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()

    async with fresh_db(dsn) as db:
        probe = await asyncpg.connect(db)
        sink = _sink.UsageSink(settings, db)
        stored = _sink.RECORDS.labels("stored")
        before = stored._value.get()
        task = asyncio.create_task(sink.run())
        first: float | None = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if task.done():
                task.result()
            if first is None and stored._value.get() > before:
                first = time.perf_counter()
            if first is not None:
                exists = await probe.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
                total = await probe.fetchval(f"SELECT sum(requests) FROM {TABLE}") if exists else 0
                if total == expected_requests:
                    break
            await asyncio.sleep(0.02)
        else:
            raise TimeoutError("the sink did not write the final totals within 300 s")
        end = time.perf_counter()
        sink.stopping.set()
        await task
        await probe.close()
    assert first is not None
    return len(records) / (end - first)


def worker_rollup_rate(streams: int, tmp: Path) -> tuple[float, int, float]:
    """(completions/s, rollup records, rollup records/s) of a worker working through
    ``streams`` preloaded completions as fast as it can."""
    from aiokafka import TopicPartition

    from benchmarks.e2e import _count_until, _http_ready, _preload, _settings, _stop, _wait_ready
    from benchmarks.e2e import _worker as start_worker
    from processor.broker import free_port
    from processor.kafka import read_to_end
    from processor.synthetic import PROVIDERS, make_stream
    from topics import RecordMeta, encode_headers

    rng = random.Random(7)
    kinds = sorted(k for k in PROVIDERS if k != "cut-off")
    per = []
    for i in range(streams):
        s = make_stream(kinds[i % len(kinds)], f"wr-{i}", rng)
        meta = {"tenant": f"tenant-{i % 50}", "provider": s.provider}
        started = T0 + (i * 600_000) // streams  # 10 minutes of request times
        recs = [
            (
                s.completion_id.encode(),
                json.dumps(c).encode(),
                encode_headers(RecordMeta(seq=n, started_at_ms=started, **meta)),
            )
            for n, c in enumerate(s.chunks)
        ]
        end = RecordMeta(end_count=len(recs), end_reason="done")
        recs.append((s.completion_id.encode(), b"", encode_headers(end)))
        per.append(recs)
    records: list[Any] = []
    live: list[int] = []
    cursors = [0] * streams
    nxt = 0
    while live or nxt < streams:
        while len(live) < 50 and nxt < streams:
            live.append(nxt)
            nxt += 1
        i = rng.choice(live)
        records.append(per[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(per[i]):
            live.remove(i)
    with EmbeddedBroker() as broker:
        settings = _settings(broker.bootstrap, tmp, web_port=free_port())
        asyncio.run(create_topics(settings))
        asyncio.run(_preload(broker.bootstrap, settings.topic_chunks, records))
        proc = start_worker(settings, tmp / "worker.log")
        try:
            t0 = _wait_ready(_http_ready(settings.web_port), proc)
            t1 = asyncio.run(
                _count_until(broker.bootstrap, settings.topic_responses, streams, timeout_s=600)
            )
            time.sleep(2)  # the last publishing round
        finally:
            _stop(proc)
        tps = [TopicPartition(settings.topic_rollups, p) for p in range(settings.partitions)]
        published = len(asyncio.run(read_to_end(settings, tps)))
    return streams / (t1 - t0), published, published / (t1 - t0)


async def run(dsn: str, keys: int, n: int, batch: int) -> dict[str, float]:
    records = rollups(keys, n)
    rows = [row_of(r, r.source_partition or 0, i) for i, r in enumerate(records)]
    latest: dict[Any, int] = {}
    for r in records:
        latest[r.key.record_key(r.source_partition)] = r.totals.requests
    figures = {
        "(a) bare COPY": await bare_copy(dsn, rows, batch),
        "(b) bare executemany": await bare_executemany(dsn, rows, batch),
        "(c) sink upsert alone": await upsert_only(dsn, rows, batch),
    }
    with EmbeddedBroker() as broker:
        figures["(d) whole sink from the topic"] = await whole_sink(
            dsn, broker.bootstrap, records, batch, sum(latest.values())
        )
    return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks sink", description=__doc__)
    parser.add_argument("--dsn", default=os.environ.get("CHUNKSTITCH_TEST_POSTGRES_DSN"))
    parser.add_argument("--keys", type=int, default=5_000)
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--streams", type=int, default=2_000, help="completions for (e)")
    args = parser.parse_args(argv)
    if not args.dsn:
        print(
            "error: no PostgreSQL: pass --dsn postgresql://user:pw@127.0.0.1:5432/db or set "
            'CHUNKSTITCH_TEST_POSTGRES_DSN (as root: eval "$(.ci/postgres.sh)")',
            file=sys.stderr,
        )
        raise SystemExit(2)
    if urlsplit(args.dsn).hostname not in ("127.0.0.1", "localhost", "::1"):
        print("error: benchmarks write only to a server on 127.0.0.1", file=sys.stderr)
        raise SystemExit(2)
    figures = asyncio.run(run(args.dsn, args.keys, args.records, args.batch))
    floor = figures["(a) bare COPY"]
    print(f"{args.records:,} rollup records over {args.keys:,} keys, batches of {args.batch:,}")
    print(f"{'variant':<32} {'rows/s':>10} {'vs COPY':>8}")
    for name, value in figures.items():
        print(f"{name:<32} {value:>10,.0f} {value / floor:>7.2f}x")
    with tempfile.TemporaryDirectory(prefix="cs-bench-sink-") as tmp:
        completions, published, rate = worker_rollup_rate(args.streams, Path(tmp))
    sink = figures["(d) whole sink from the topic"]
    print(
        f"(e) worker at full speed: {completions:,.0f} completions/s, {published:,} rollup "
        f"records in all, {rate:,.0f} rollup records/s; sink margin (d)/(e): {sink / rate:.0f}x"
    )
