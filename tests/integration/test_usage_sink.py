"""The usage sink against a real PostgreSQL server and the real embedded broker.

Server: CHUNKSTITCH_TEST_POSTGRES_DSN (``.ci/run`` starts one; see tests/helpers/postgres.py).
The database-restart test runs its own throwaway cluster so it can stop it safely.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from processor.broker import free_port
from processor.core import result
from processor.settings import Settings
from processor.usage._pg import (
    COLUMNS,
    KEY_COLUMNS,
    MEASURES,
    MIGRATIONS,
    TABLE,
    migrate,
    query_page,
    query_usage,
    row_of,
    schema_version,
    upsert,
)
from tests.helpers.postgres import ThrowawayCluster, fresh_database, server_dsn
from tests.helpers.rollups import aggregate, read_rollups
from tests.helpers.worker import env_for, isolated_settings, make_topics, read_quiet
from topics import DeadLetter, UsageKey, UsageRollup, UsageTotals

T0 = 1_760_000_000_000 // 86_400_000 * 86_400_000  # a day boundary


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll ``check`` until it holds or ``timeout_s`` passed (the caller asserts after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not await check():  # noqa: ASYNC110
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class Query:
    """The fields of the live read model's query model that query_page reads."""

    window: str = "1m"
    by: tuple[str, ...] = ("tenant", "model", "provider", "status")
    since_ms: int | None = None
    until_ms: int | None = None
    tenant: str | None = None
    model: str | None = None
    provider: str | None = None
    status: str | None = None
    user: str | None = None
    limit: int = 1000
    cursor: str | None = None

    def filters(self) -> dict[str, str]:
        dims = ("tenant", "model", "provider", "status", "user")
        return {d: getattr(self, d) for d in dims if getattr(self, d)}


@pytest.fixture
async def db() -> AsyncIterator[str]:
    async with fresh_database(server_dsn()) as dsn:
        yield dsn


def _rollup(i: int, step: int, source_partition: int) -> UsageRollup:
    """Absolute totals of bucket ``i`` after ``step`` updates (grows with step)."""
    key = UsageKey(
        window_start_ms=T0 + (i % 50) * 3_600_000 + (i % 7) * 60_000,  # spread over ~2 days
        window_ms=60_000,
        tenant=f"tenant-{i % 3}",
        model=f"model-{i % 2}",
        provider="openai" if i % 4 else "azure",
        status="complete" if i % 5 else "error",
        late=i % 11 == 0,
        user=f"user-{i % 4}" if i % 3 else "unknown",
        attributes={"feature": f"f|{i % 2}"} if i % 5 != 1 else {},  # '|': escaped in the key
    )
    ttfc = [0] * 14
    ttfc[i % 14] = step
    dur = [0] * 14
    dur[(i + 3) % 14] = step
    totals = UsageTotals(
        requests=step,
        complete=step if i % 5 else 0,
        error=0 if i % 5 else step,
        without_usage=step // 3,
        prompt_tokens=100 * step + i,
        completion_tokens=7 * step,
        total_tokens=107 * step + i,
        cached_prompt_tokens=step,
        reasoning_tokens=2 * step,
        cost_nano_usd=1_000 * step,
        with_cost=step,
        ttfc_ms_buckets=tuple(ttfc),
        duration_ms_buckets=tuple(dur),
        rate_tokens=7 * step,
        rate_duration_ms=50 * step,
    )
    return result(key, totals, source_partition)


def rollup_records(
    n_keys: int, updates: int, seed: int, partitions: int = 4
) -> list[tuple[bytes, bytes]]:
    """Successive absolute totals of ``n_keys`` buckets, interleaved, each key in order."""
    rng = random.Random(seed)
    pending = dict.fromkeys(range(n_keys), 1)
    out = []
    while pending:
        i = rng.choice(list(pending))
        rollup = _rollup(i, pending[i], i % partitions)
        out.append(
            (
                rollup.key.record_key(rollup.source_partition).encode(),
                rollup.model_dump_json().encode(),
            )
        )
        pending[i] += 1
        if pending[i] > updates:
            del pending[i]
    return out


async def produce_rollups(settings: Settings, records: list[tuple[bytes, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(settings.topic_rollups, v, key=k) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed(settings: Settings) -> int:
    """Records the sink's consumer group has committed, over all partitions."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker, group_id=settings.usage_sink_group
    )
    await consumer.start()
    try:
        total = 0
        for p in range(settings.partitions):
            offset = await consumer.committed(TopicPartition(settings.topic_rollups, p))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


async def topic_truth(settings: Settings) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """What the table must hold: the latest valid record of each key on the rollup topic."""
    from aiokafka import TopicPartition

    from processor.kafka import read_to_end

    tps = [TopicPartition(settings.topic_rollups, p) for p in range(settings.partitions)]
    latest: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for rec in await read_to_end(settings, tps):
        try:
            row = row_of(UsageRollup.model_validate_json(rec.value), rec.partition, rec.offset)
        except ValueError:
            continue
        latest[row[: len(KEY_COLUMNS)]] = row[len(KEY_COLUMNS) : len(KEY_COLUMNS) + len(MEASURES)]
    return latest


async def table(dsn: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE):
            return {}
        rows = await conn.fetch(f"SELECT {', '.join((*KEY_COLUMNS, *MEASURES))} FROM {TABLE}")
    finally:
        await conn.close()
    n = len(KEY_COLUMNS)
    at = KEY_COLUMNS.index("attributes")

    def key(r: Any) -> tuple[Any, ...]:  # jsonb comes back re-spaced: compare as row_of writes
        k = list(r[:n])
        k[at] = json.dumps(json.loads(k[at]), sort_keys=True, separators=(",", ":"))
        return tuple(k)

    return {
        key(r): tuple(list(v) if isinstance(v, list) else v for v in tuple(r)[n:]) for r in rows
    }


async def until_table_equals(
    dsn: str, truth: dict[Any, Any], timeout_s: float, sink: SinkProcess
) -> None:
    deadline = time.monotonic() + timeout_s
    got: dict[Any, Any] = {}
    while time.monotonic() < deadline:
        try:
            got = await table(dsn)
        except (OSError, asyncpg.PostgresError):
            got = {}
        if got == truth:
            return
        await asyncio.sleep(0.3)
    missing = set(truth) - set(got)
    differ = [k for k in truth if k in got and got[k] != truth[k]]
    raise AssertionError(
        f"table != topic totals after {timeout_s}s: {len(missing)} keys missing, "
        f"{len(differ)} differ, {len(set(got) - set(truth))} extra; sink log: {sink.log_path}"
    )


@dataclass
class SinkProcess:
    """``chunkstitch usage sink`` as a real subprocess."""

    settings: Settings
    dsn: str
    log_path: Path
    port: int = field(default_factory=free_port)
    group: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SinkProcess:
        argv = [sys.executable, "-m", "processor", "usage", "sink", "--port", str(self.port)]
        if self.group:
            argv += ["--group", self.group]
        env = env_for(self.settings, CHUNKSTITCH_USAGE_DSN=self.dsn)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"sink exited {self.proc.returncode}: {self.log_text()}"
            )
            try:
                self.get("/healthz")
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"sink not serving within 30s; see {self.log_path}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
            return str(r.read().decode())

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return None if self.proc is None else self.proc.returncode


# --- the database side alone --------------------------------------------------------------


async def test_schema_is_versioned_and_upserts_never_go_back(db: str) -> None:
    conn = await asyncpg.connect(db)
    try:
        assert await schema_version(conn) == 0
        assert await migrate(conn) == [v for v, _, _ in MIGRATIONS]
        assert await migrate(conn) == []  # second run: nothing to do
        assert await schema_version(conn) == MIGRATIONS[-1][0]
        columns = {
            r[0]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1", TABLE
            )
        }
        assert set(COLUMNS) <= columns, "a UsageTotals field has no column: add a migration"

        newer = row_of(_rollup(1, 5, 0), rollup_partition=2, rollup_offset=50)
        older = row_of(_rollup(1, 3, 0), rollup_partition=2, rollup_offset=30)
        other = row_of(_rollup(2, 1, 1), rollup_partition=1, rollup_offset=7)
        assert await upsert(conn, [newer, other]) == 2
        assert await upsert(conn, [newer, other]) == 0  # redelivered: nothing changes
        assert await upsert(conn, [older]) == 0  # stale redelivery never overwrites
        assert await upsert(conn, [newer, older, older]) == 0  # one batch, any order
        requests = await conn.fetchval(f"SELECT requests FROM {TABLE} WHERE rollup_offset = 50")
        assert requests == 5
        newest = row_of(_rollup(1, 9, 0), rollup_partition=2, rollup_offset=90)
        assert await upsert(conn, [older, newest]) == 1
        assert await conn.fetchval(f"SELECT max(requests) FROM {TABLE}") == 9
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE}") == 2
    finally:
        await conn.close()


async def test_query_equals_the_kafka_side_aggregate_and_the_views_read_it(
    broker: str, tmp_path: Path, db: str
) -> None:
    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    await produce_rollups(settings, rollup_records(300, 3, seed=5))
    conn = await asyncpg.connect(db)
    try:
        await migrate(conn)
        rollups = await read_rollups(settings)
        await upsert(conn, [row_of(r, 0, 1) for r in rollups])
        cases: list[dict[str, Any]] = [
            {"window": "1m"},
            {"window": "1h", "by": ["tenant", "model"]},
            {"window": "1d", "by": ["tenant"]},
            {"window": "1d", "by": []},
            {"window": "1h", "by": ["model", "status"], "since_ms": T0 + 3 * 3_600_000},
            {"window": "1m", "since_ms": T0 + 600_000, "until_ms": T0 + 20 * 3_600_000},
            {"window": "1h", "by": ["provider"], "filters": {"tenant": "tenant-1", "model": ""}},
            {"window": "1h", "by": ["tenant", "user"]},
            {"window": "1d", "by": ["user", "attr.feature"]},
            {"window": "1m", "by": ["attr.feature", "attr.env"]},  # env: never sent (unknown)
            {"window": "1h", "by": ["model"], "filters": {"user": "user-1"}},
            {"window": "1h", "by": ["user"], "filters": {"attr.feature": "f|1"}},
        ]
        for case in cases:
            kafka = aggregate(rollups, **case)
            assert kafka, case
            assert await query_usage(conn, **case) == kafka, case
        limited = await query_usage(conn, "1h", ["tenant"], limit=5)
        assert limited == aggregate(rollups, window="1h", by=["tenant"])[:5]
        with pytest.raises(ValueError, match="window must be one of"):
            await query_usage(conn, "2h")

        # Pages for the live read model's query model: whole windows, keyset cursor.
        q = Query(window="1h", by=("tenant", "model"), since_ms=T0 + 90 * 60_000, limit=7)
        pages: list[dict[str, Any]] = []
        page = await query_page(conn, q)
        while True:
            pages += page["rows"]
            assert len(page["rows"]) <= 7
            if page["next_cursor"] is None:
                break
            page = await query_page(conn, replace(q, cursor=page["next_cursor"]))
        whole_windows = await query_usage(conn, "1h", ["tenant", "model"], since_ms=T0 + 3_600_000)
        assert pages == whole_windows
        assert len(pages) > 14
        one = await query_page(conn, replace(q, tenant="tenant-2", limit=10_000))
        assert one["next_cursor"] is None
        assert one["rows"] == [r for r in whole_windows if r["key"]["tenant"] == "tenant-2"]
        with pytest.raises(ValueError, match="cursor is not one this query returned"):
            await query_page(conn, replace(q, cursor="bm90IGEgY3Vyc29y"))
        by_user = Query(window="1h", by=("user",), limit=3)
        pages = []
        page = await query_page(conn, by_user)
        while True:
            pages += page["rows"]
            if page["next_cursor"] is None:
                break
            page = await query_page(conn, replace(by_user, cursor=page["next_cursor"]))
        assert pages == await query_usage(conn, "1h", ["user"])
        with pytest.raises(ValueError, match="attribute name"):
            await query_usage(conn, "1h", ["attr.Bad-Name"])

        daily = await conn.fetch(
            "SELECT tenant, sum(requests) AS r FROM chunkstitch_usage_tenant_daily GROUP BY 1"
        )
        expected: dict[str, int] = {}
        for r in rollups:
            expected[r.key.tenant] = expected.get(r.key.tenant, 0) + r.totals.requests
        assert {r["tenant"]: r["r"] for r in daily} == expected
        panel_sql = _grafana_panel_sql()
        assert panel_sql
        for sql in panel_sql:
            rows = await conn.fetch(
                sql.replace("$__timeFilter(day)", "day >= to_timestamp(0)").replace(
                    "$__timeFilter(hour)", "hour >= to_timestamp(0)"
                )
            )
            assert rows, sql
    finally:
        await conn.close()


def _grafana_panel_sql() -> list[str]:
    dashboard = json.loads(
        (Path(__file__).parents[2] / "deploy" / "grafana" / "usage-history.json").read_text()
    )
    return [t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", []) if "rawSql" in t]


# --- the sink process ----------------------------------------------------------------------


async def test_sink_converges_after_kill_9_redelivery_and_bad_records(
    broker: str, tmp_path: Path, db: str
) -> None:
    settings = isolated_settings(broker, tmp_path, usage_sink_batch_max=50)
    await make_topics(settings)
    records = rollup_records(200, 6, seed=9)
    third = len(records) // 3
    bad: list[tuple[bytes, bytes | None]] = [
        (b"bad-json", b"{not json"),
        (b"bad-shape", json.dumps({"key": {"window_ms": 60000}}).encode()),
        (
            b"bad-nul",
            _rollup(3, 1, 0)
            .model_copy(
                update={"key": _rollup(3, 1, 0).key.model_copy(update={"tenant": "a\x00b"})}
            )
            .model_dump_json()
            .encode(),
        ),
        (b"tombstone", None),
        (b"bad-huge", b"x" * 600_000),  # its dead letter keeps the first 512 KiB
    ]
    await produce_rollups(settings, [*records[:third], *bad])
    sink = SinkProcess(settings, db, tmp_path / "sink-1.log").start()
    try:
        await produce_rollups(settings, records[third : 2 * third])

        async def some_rows() -> bool:
            return len(await table(db)) >= 50

        await eventually(some_rows, 30)
        assert len(await table(db)) >= 50, sink.log_text()
    finally:
        sink.kill9()  # mid-run: written rows whose offsets were not committed get replayed
    await produce_rollups(settings, records[2 * third :])
    restarted = SinkProcess(settings, db, tmp_path / "sink-2.log").start()
    try:
        truth = await topic_truth(settings)
        assert len(truth) == 200
        await until_table_equals(db, truth, 60, restarted)
        assert restarted.metric("chunkstitch_usage_sink_db_up") == 1
    finally:
        assert restarted.stop() == 0

    letters = [
        DeadLetter.model_validate_json(v)
        for _, v in await read_quiet(settings, settings.topic_deadletter, quiet_s=1.5)
    ]
    # at least once: a letter sent before the kill -9 may be sent again by the restarted sink
    by_source = {(dl.source_partition, dl.source_offset): dl for dl in letters}
    assert len(by_source) == 4, letters
    assert [dl.value_truncated for dl in by_source.values()].count(True) == 1
    assert {dl.reason for dl in letters} == {"invalid_rollup"}
    messages = sorted(dl.message for dl in by_source.values())
    assert any("NUL" in m for m in messages), messages
    assert any("not a usage rollup" in m for m in messages), messages
    assert (
        "invalid rollup record sent to the dead-letter topic"
        in (tmp_path / "sink-1.log").read_text()
    )

    # A new group replays the whole topic, every stale value included: nothing changes.
    replay = SinkProcess(settings, db, tmp_path / "sink-3.log", group="replay").start()
    try:
        stored = 'chunkstitch_usage_sink_records_total{outcome="stored"}'

        async def replayed() -> bool:
            return replay.metric(stored) >= len(records)

        await eventually(replayed, 30)
        assert replay.metric('chunkstitch_usage_sink_records_total{outcome="stored"}') >= len(
            records
        )
        assert replay.metric("chunkstitch_usage_sink_rows_changed_total") == 0
        assert await table(db) == truth
    finally:
        replay.stop()


async def test_database_restarted_mid_run_loses_nothing(broker: str, tmp_path: Path) -> None:
    cluster = ThrowawayCluster()
    try:
        await asyncio.to_thread(cluster.create)
        dsn = cluster.dsn
        settings = isolated_settings(broker, tmp_path, usage_sink_retry_max_s=1.0)
        await make_topics(settings)
        records = rollup_records(120, 4, seed=13)
        half = len(records) // 2
        await produce_rollups(settings, records[:half])
        sink = SinkProcess(settings, dsn, tmp_path / "sink.log").start()
        try:
            first = await topic_truth(settings)
            await until_table_equals(dsn, first, 30, sink)
            await asyncio.to_thread(cluster.stop)
            await produce_rollups(settings, records[half:])

            async def retrying() -> bool:
                return sink.metric("chunkstitch_usage_sink_db_errors_total") >= 2

            await eventually(retrying, 30)
            assert sink.metric("chunkstitch_usage_sink_db_errors_total") >= 2, sink.log_text()
            assert sink.metric("chunkstitch_usage_sink_db_up") == 0
            assert "retrying, offsets not committed" in sink.log_text()
            assert await committed(settings) <= half  # nothing of the second half committed
            await asyncio.to_thread(cluster.start)
            await until_table_equals(dsn, await topic_truth(settings), 60, sink)
            assert sink.metric("chunkstitch_usage_sink_db_up") == 1
            assert "PostgreSQL is back" in sink.log_text()
        finally:
            assert sink.stop() == 0
    finally:
        await asyncio.to_thread(cluster.destroy)


async def test_sink_says_in_one_line_what_is_wrong(tmp_path: Path, db: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "processor", "usage", "sink", *args],
            env={
                **env_for(isolated_settings(f"127.0.0.1:{free_port()}", tmp_path)),
                "CHUNKSTITCH_USAGE_DSN": "",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = await asyncio.to_thread(run)
    assert missing.returncode == 2
    assert "pass --dsn postgresql://" in missing.stderr
    empty = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor", "usage", "--json", "--dsn", db],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # asked for the history, the sink never ran against it: say so, no silent fallback
    assert empty.returncode == 2
    assert "has run against it" in empty.stderr
    assert empty.stdout == ""
    parts = urlsplit(db)
    netloc = f"{parts.username}:not-the-pw@{parts.hostname}:{parts.port or 5432}"
    wrong = urlunsplit(parts._replace(netloc=netloc))
    refused = await asyncio.to_thread(run, "--dsn", wrong, "--port", str(free_port()))
    assert refused.returncode == 2
    assert "fix the user, password or database" in refused.stderr
    assert "not-the-pw" not in refused.stderr + refused.stdout
    no_broker = await asyncio.to_thread(run, "--dsn", db, "--port", str(free_port()))
    assert no_broker.returncode == 2, no_broker.stderr
    assert "cannot reach the Kafka broker" in no_broker.stderr
    for proc in (missing, refused, no_broker, empty):
        assert "Traceback" not in proc.stderr
