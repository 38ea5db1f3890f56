"""``chunkstitch usage sink``: the rollup topic into PostgreSQL, idempotently.

A consumer group on the rollup topic. Per fetch (up to ``usage_sink_batch_max`` records):
validate each record (one that does not validate, or cannot be stored, becomes an
``invalid_rollup`` dead letter: logged, counted, acknowledged by the broker first), upsert
the rows in one transaction (:func:`processor.usage._pg.upsert`: a row is replaced only by
a record from a later rollup offset), and only then commit the consumer offsets. So a crash
at any point replays records whose rows are already in the database, which changes
nothing. While the database is away the sink retries the same batch with capped
exponential backoff, commits nothing and says so in its log and metrics.

Its own web server (``usage_sink_port``) serves ``/healthz``, ``/readyz`` (database
reachable) and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import signal
import time
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from processor.logs import get_logger
from processor.settings import Settings
from processor.usage._pg import InvalidRollup, Row, migrate, redact_dsn, row_of, upsert
from topics import DEADLETTER_VALUE_MAX, DeadLetter, UsageRollup

__all__ = ["SINK_REGISTRY", "UsageSink", "run_sink"]

log = get_logger("chunkstitch.usage.sink")

SINK_REGISTRY = CollectorRegistry(auto_describe=True)
RECORDS = Counter(
    "chunkstitch_usage_sink_records",
    "Rollup records handled by the usage sink, by outcome (stored, invalid, tombstone).",
    ["outcome"],
    registry=SINK_REGISTRY,
)
ROWS_CHANGED = Counter(
    "chunkstitch_usage_sink_rows_changed",
    "Rows inserted or updated in PostgreSQL (a replayed record changes none).",
    registry=SINK_REGISTRY,
)
DEAD_LETTERS = Counter(
    "chunkstitch_usage_sink_dead_letters",
    "Rollup records sent to the dead-letter topic, by reason.",
    ["reason"],
    registry=SINK_REGISTRY,
)
DB_ERRORS = Counter(
    "chunkstitch_usage_sink_db_errors",
    "Failed attempts to write a batch to PostgreSQL (each is retried with backoff).",
    registry=SINK_REGISTRY,
)
DB_UP = Gauge(
    "chunkstitch_usage_sink_db_up",
    "1 while the last database operation succeeded, 0 while the sink retries.",
    registry=SINK_REGISTRY,
)
LAG = Gauge(
    "chunkstitch_usage_sink_lag",
    "Rollup records between the sink's committed position and the partition end.",
    ["partition"],
    registry=SINK_REGISTRY,
)
BATCH_SECONDS = Histogram(
    "chunkstitch_usage_sink_batch_seconds",
    "Time to write one batch to PostgreSQL (successful attempts).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=SINK_REGISTRY,
)

_FATAL_DB = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


class SinkConfigError(RuntimeError):
    """The DSN is wrong (password, role, database): retrying cannot help."""


class UsageSink:
    """One sink process: consumer, producer (dead letters), database connection."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self.conn: asyncpg.Connection | None = None
        self.stopping = asyncio.Event()
        self.assigned = False

    # --- database ------------------------------------------------------------------------
    async def _connect(self) -> asyncpg.Connection:
        if self.conn is not None and not self.conn.is_closed():
            return self.conn
        self.conn = None
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5, command_timeout=30)
        except _FATAL_DB as exc:
            raise SinkConfigError(
                f"PostgreSQL at {self.where} refused the sink ({exc}); "
                "fix the user, password or database in CHUNKSTITCH_USAGE_DSN / --dsn"
            ) from None
        try:
            applied = await migrate(conn)
        except asyncpg.InsufficientPrivilegeError as exc:
            conn.terminate()
            raise SinkConfigError(
                f"PostgreSQL at {self.where} does not let the sink create its schema ({exc}); "
                "grant the role CREATE on the database (or run the sink once as its owner)"
            ) from None
        if applied:
            log.info("usage schema migrated", database=self.where, versions=applied)
        self.conn = conn
        return conn

    async def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def write(self, rows: list[Row]) -> None:
        """Write rows, retrying with capped exponential backoff until it succeeds (or the
        sink is asked to stop: then raise, and commit nothing)."""
        attempt = 0
        while True:
            try:
                conn = await self._connect()
                started = time.perf_counter()
                changed = await upsert(conn, rows)
            except SinkConfigError:
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                attempt += 1
                DB_ERRORS.inc()
                DB_UP.set(0)
                await self._drop_connection()
                delay = min(self.settings.usage_sink_retry_max_s, 0.2 * 2 ** min(attempt, 10))
                delay *= 0.8 + 0.4 * random.random()
                log.warning(
                    "cannot write usage rows to PostgreSQL; retrying, offsets not committed",
                    database=self.where,
                    error=f"{type(exc).__name__}: {exc}",
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                    rows=len(rows),
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                if self.stopping.is_set():
                    raise
                continue
            BATCH_SECONDS.observe(time.perf_counter() - started)
            ROWS_CHANGED.inc(changed)
            if attempt:
                log.info(
                    "PostgreSQL is back; usage rows written",
                    database=self.where,
                    attempts=attempt + 1,
                )
            DB_UP.set(1)
            return

    # --- Kafka -----------------------------------------------------------------------------
    def _dead_letter(self, rec: Any, message: str) -> DeadLetter:
        return DeadLetter(
            reason="invalid_rollup",
            message=message,
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
            source_timestamp_ms=rec.timestamp,
            key_b64=DeadLetter.b64(rec.key),
            value_b64=DeadLetter.b64(rec.value[:DEADLETTER_VALUE_MAX]) or "",
            value_size=len(rec.value),
            value_truncated=len(rec.value) > DEADLETTER_VALUE_MAX,
            headers=[(k, DeadLetter.b64(v) or "") for k, v in (rec.headers or ())],
            worker=f"usage-sink:{self.settings.usage_sink_group}",
        )

    def rows_of(self, records: list[Any]) -> tuple[list[Row], list[DeadLetter]]:
        """Rows to store and dead letters, for one fetch of records."""
        rows: list[Row] = []
        dead: list[DeadLetter] = []
        for rec in records:
            if rec.value is None:
                RECORDS.labels("tombstone").inc()  # compaction marker: history stays
                continue
            try:
                rows.append(
                    row_of(UsageRollup.model_validate_json(rec.value), rec.partition, rec.offset)
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "record"
                dead.append(self._dead_letter(rec, f"not a usage rollup: {where}: {first['msg']}"))
            except InvalidRollup as exc:
                dead.append(self._dead_letter(rec, f"cannot store this rollup: {exc}"))
        RECORDS.labels("stored").inc(len(rows))
        return rows, dead

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.errors import CommitFailedError, IllegalStateError

        s = self.settings
        await self._connect_with_retry()
        consumer = AIOKafkaConsumer(
            s.topic_rollups,
            **s.kafka_kwargs(),
            group_id=s.usage_sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            fetch_max_wait_ms=200,
        )
        producer = AIOKafkaProducer(**s.kafka_kwargs(), acks="all")
        await consumer.start()
        await producer.start()
        log.info(
            "usage sink running",
            topic=s.topic_rollups,
            group=s.usage_sink_group,
            database=self.where,
        )
        try:
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=500, max_records=s.usage_sink_batch_max)
                self.assigned = bool(consumer.assignment())
                records = [rec for recs in batch.values() for rec in recs]
                if records:
                    rows, dead = self.rows_of(records)
                    if dead:
                        await self._send_dead_letters(producer, dead)
                    if rows:
                        try:
                            await self.write(rows)
                        except (
                            TimeoutError,
                            OSError,
                            asyncpg.PostgresError,
                            asyncpg.InterfaceError,
                        ):
                            break  # stopping while the database is away: commit nothing
                    offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}
                    try:
                        await consumer.commit(offsets)
                    except (CommitFailedError, IllegalStateError) as exc:
                        # a rebalance took the partitions: their new owner replays the records,
                        # and replaying changes nothing in the table
                        log.warning("offset commit refused after a rebalance", error=str(exc))
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is not None:
                        LAG.labels(str(tp.partition)).set(
                            max(0, high - await consumer.position(tp))
                        )
        finally:
            await asyncio.shield(consumer.stop())
            await asyncio.shield(producer.stop())
            await self._drop_connection()
            log.info("usage sink stopped")

    async def _connect_with_retry(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                DB_UP.set(1)
                return
            except SinkConfigError:
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                attempt += 1
                DB_UP.set(0)
                delay = min(self.settings.usage_sink_retry_max_s, 0.2 * 2 ** min(attempt, 10))
                log.warning(
                    "cannot reach PostgreSQL; retrying",
                    database=self.where,
                    error=f"{type(exc).__name__}: {exc}",
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def _send_dead_letters(self, producer: Any, dead: list[DeadLetter]) -> None:
        futures = []
        for letter in dead:
            log.warning(
                "invalid rollup record sent to the dead-letter topic",
                reason=letter.reason,
                message=letter.message,
                partition=letter.source_partition,
                offset=letter.source_offset,
            )
            DEAD_LETTERS.labels(letter.reason).inc()
            RECORDS.labels("invalid").inc()
            key = None if letter.key_b64 is None else base64.b64decode(letter.key_b64)
            futures.append(
                await producer.send(
                    self.settings.topic_deadletter, letter.model_dump_json().encode(), key=key
                )
            )
        await asyncio.gather(*futures)


async def _serve(sink: UsageSink) -> Any:
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        ready = sink.conn is not None and not sink.conn.is_closed()
        return web.json_response(
            {"ready": ready, "assigned": sink.assigned}, status=200 if ready else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(SINK_REGISTRY), content_type="text/plain")

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, sink.settings.web_host, sink.settings.usage_sink_port)
    await site.start()
    return runner


async def run_sink(settings: Settings, dsn: str) -> None:
    """Run the sink until SIGTERM / SIGINT; raises :class:`SinkConfigError` on a bad DSN."""
    sink = UsageSink(settings, dsn)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.stopping.set)
    runner = await _serve(sink)
    try:
        await sink.run()
    finally:
        await runner.cleanup()
