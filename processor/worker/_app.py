"""The faust-streaming application: a thin shell around :class:`Stitcher`.

One agent (concurrency 1) takes chunk records one by one, holds their acks
(``message.incref()``), feeds them to the stitcher and seals a round whenever its queue is
empty; the stitcher releases the acks in offset order once the responses they produced
are durable. A timer applies the time-based detection rules. If outputs cannot be made
durable the worker stops with an error. Web views: ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import faust
from faust.web import Request, Response, View

from processor import metrics
from processor.logs import get_logger
from processor.settings import Settings
from processor.worker._fetch_wait import install_fetch_wait
from processor.worker._stitcher import Record, Stitcher

__all__ = ["PLUGINS", "create_app"]

log = get_logger("chunkstitch.worker")

Plugin = Callable[[faust.App, Settings], None]


def _usage_plugin(app: faust.App, settings: Settings) -> None:
    if not settings.usage_enabled:
        return
    from processor.usage import register

    register(app, settings)


PLUGINS: list[Plugin] = [_usage_plugin]
"""Extensions registered on every app the factory builds (``register(app, settings)``):
the usage rollups add their agent and ``/usage`` view here."""


def create_app(settings: Settings) -> faust.App:
    """Build the worker's faust app from settings (no I/O until it is started)."""
    worker_id = f"{socket.gethostname()}:{settings.web_port}:{os.getpid()}"
    datadir = Path(settings.data_dir) / f"worker-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    install_fetch_wait(settings.fetch_max_wait_ms)
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        broker_credentials=_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        datadir=str(datadir),
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        topic_partitions=settings.partitions,
        topic_disable_leader=True,  # no leader-only work; one internal topic fewer
        producer_acks=-1,
        # room for the largest response (larger ones are cut, see max_response_bytes)
        producer_max_request_size=max(settings.max_response_bytes + 64 * 1024, 1024 * 1024),
        processing_guarantee="at_least_once",
        table_standby_replicas=0,
    )
    chunks = app.topic(
        settings.topic_chunks,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )

    async def send(
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> Awaitable[Any]:
        fut: Awaitable[Any] = await app.producer.send(topic, key, value, partition, None, headers)
        return fut

    stitcher = Stitcher(settings, send, time.monotonic, worker_id)
    stitcher.on_failure = lambda exc: _stop_worker(app, exc)
    app.stitcher = stitcher  # type: ignore[attr-defined]
    state = {"assigned": False}

    @app.agent(chunks, concurrency=1)
    async def stitch(stream: faust.StreamT[bytes]) -> None:
        # Natural batching: records are handled as they arrive; a round is sealed (flush)
        # as soon as no further record waits in the agent's queue, or after ``batch_max``
        # records. An idle worker answers at once, a busy one batches by itself; no timer
        # holds a record back. The stitcher lock keeps the timer out of an open round.
        consumer = app.consumer
        lock = stitcher.lock
        queue_empty = cast(Any, stream).channel.empty
        in_round = 0
        try:
            async for event in stream.events():
                if not in_round:
                    await lock.acquire()
                message = event.message
                message.incref()  # held: released in offset order by the stitcher
                record = Record(
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    key=message.key,
                    value=message.value,
                    headers=list(message.headers or ()),
                    timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
                )
                await stitcher.handle(record, _releaser(message, consumer))
                in_round += 1
                if in_round >= settings.batch_max or queue_empty():
                    in_round = 0
                    try:
                        await stitcher.flush()
                    finally:
                        lock.release()
        finally:
            if in_round:
                lock.release()

    @app.timer(settings.tick_interval_s)  # type: ignore[untyped-decorator,unused-ignore]
    async def tick() -> None:
        async with stitcher.lock:
            stitcher.tick()
            await stitcher.flush()
        _update_lag(app, settings, stitcher)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type,unused-ignore]
    async def on_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        async with stitcher.lock:
            stitcher.revoke([tp.partition for tp in revoked if tp.topic == settings.topic_chunks])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type,unused-ignore]
    async def on_assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        stitcher.preload([tp.partition for tp in assigned if tp.topic == settings.topic_chunks])

    @app.on_rebalance_complete.connect  # type: ignore[arg-type,unused-ignore]
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        if not state["assigned"]:
            _freeze_startup_objects()
        state["assigned"] = True
        log.info("rebalance complete", partitions=sorted(_assigned(app, settings)))

    @app.page("/healthz")
    class Healthz(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok", "worker": worker_id})

    @app.page("/readyz")
    class Readyz(View):
        async def get(self, request: Request) -> Response:
            ready = bool(state["assigned"]) and not app.rebalancing
            body = {
                "ready": ready,
                "partitions": sorted(_assigned(app, settings)),
                "in_flight": sum(len(p.open) for p in stitcher.parts.values()),
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    for plugin in PLUGINS:
        plugin(app, settings)
    return app


_pending: set[asyncio.Future[None]] = set()


def _freeze_startup_objects() -> None:
    """Move everything allocated while starting (modules, faust's services, the app) out of
    the collector's reach. Otherwise every full collection walks them again: a pause of
    tens of milliseconds on the hot path, which showed up directly in the p99 latency."""
    gc.collect()
    gc.freeze()
    log.info("startup objects frozen for the garbage collector", objects=gc.get_freeze_count())


def _stop_worker(app: faust.App, exc: BaseException) -> None:
    """Outputs could not be made durable (the producer gave up): stop the whole worker
    with an error so that it is restarted and replays from its last committed offsets.
    Carrying on would hold the failed round's offsets forever and stall the partition."""
    log.critical(
        "stopping the worker: a round of outputs could not be written; check the broker "
        "and the output topics, then restart (unacknowledged records are replayed)",
        error=f"{type(exc).__name__}: {exc}",
    )
    task = asyncio.ensure_future(app.crash(exc))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def _releaser(message: Any, consumer: Any) -> Callable[[], None]:
    def release() -> None:
        message.ack(consumer)

    return release


def _assigned(app: faust.App, settings: Settings) -> set[int]:
    try:
        return {
            tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_chunks
        }
    except Exception:  # the consumer is not started yet
        return set()


def _update_lag(app: faust.App, settings: Settings, stitcher: Stitcher) -> None:
    """Consumer lag per partition: the fetch high watermark minus the next offset to take."""
    try:
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != settings.topic_chunks:
                continue
            highwater = consumer.highwater(tp)
            last = stitcher.last_offset.get(tp.partition)
            if highwater is not None:
                taken = last + 1 if last is not None else 0
                metrics.LAG.labels(str(tp.partition)).set(max(highwater - taken, 0))
    except Exception:  # metrics must never break the worker
        return


def _credentials(settings: Settings) -> Any:
    if not settings.sasl_mechanism and settings.security_protocol == "PLAINTEXT":
        return None
    import ssl

    ctx: ssl.SSLContext | None = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:
            ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    if settings.sasl_mechanism:
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        return faust.SASLCredentials(
            username=settings.sasl_username or "",
            password=password,
            mechanism=settings.sasl_mechanism,
            ssl_context=ctx,
        )
    return faust.SSLCredentials(ctx)
