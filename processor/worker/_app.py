"""The faust-streaming application: a thin shell around :class:`Stitcher`.

The chunk topic's records reach the stitcher in whole fetched batches, one round per
batch (:mod:`processor.worker._faust` contains the faust internals this needs); the
stitcher holds their acks and releases them in offset order into faust's commit
bookkeeping once the responses they produced are durable. Everything else stays faust:
group membership, assignment, commits, rebalance signals, timers, web views and the
usage agent. A timer applies the time-based detection rules. Outputs and time rules are
fenced by a membership lease; a watchdog stops the worker non-zero when a wait on the
broker outlasts the stall timeout, or when outputs cannot be made durable.
Web views: ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import faust
from faust.web import Request, Response, View

from processor import metrics
from processor._malloc import start_trimming
from processor.logs import get_logger
from processor.settings import Settings
from processor.worker import _faust
from processor.worker._stitcher import Stitcher
from processor.worker._supervise import supervisor
from processor.worker._watchdog import EXIT_STALLED, LoopMonitor, Watchdog

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
        producer_request_timeout=settings.producer_request_timeout_s,
        broker_max_poll_records=settings.batch_max,
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
    app.topics.add(chunks)  # subscribed; its records take the batch path, not a stream

    async def send(
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> Awaitable[Any]:
        fut: Awaitable[Any] = await app.producer.send(topic, key, value, partition, None, headers)
        return fut

    lease = _faust.MembershipLease(settings.session_timeout_s, settings.lease_fraction)

    def ack(partition: int, offsets: list[int]) -> None:
        _faust.ack_offsets(app.consumer, tps[partition], offsets)

    tps: dict[int, Any] = _TPs(settings.topic_chunks)
    app.lease = lease  # type: ignore[attr-defined]  # the usage publisher is gated on it too
    stitcher = Stitcher(settings, send, time.monotonic, worker_id, acker=ack, lease=lease)
    stitcher.on_failure = lambda exc: _stop_worker(app, exc, stitcher.failure_what)
    app.stitcher = stitcher  # type: ignore[attr-defined]
    _faust.install(app, stitcher, lease, settings)
    state: dict[str, Any] = {"assigned": False, "rebalance_since": None}

    watchdog = Watchdog(settings.stall_timeout_s)
    watchdog.add("produce acknowledgements from the broker", stitcher.oldest_round_age)
    watchdog.add(
        "the group coordinator to confirm this member (heartbeat or rejoin)",
        lambda now: 0.0 if lease.valid(now) or lease.lost_at is None else now - lease.lost_at,
    )
    watchdog.add(
        "the consumer group rebalance to complete",
        lambda now: 0.0 if state["rebalance_since"] is None else now - state["rebalance_since"],
    )
    monitor = LoopMonitor(settings.stall_timeout_s)
    app.watchdog = watchdog  # type: ignore[attr-defined]

    sup = supervisor(app)

    @app.timer(settings.tick_interval_s)  # type: ignore[untyped-decorator,unused-ignore]
    @sup.guard("time-rule timer")  # a timer that dies stops the worker, loudly
    async def tick() -> None:
        _note_highwaters(app, settings, stitcher)
        async with stitcher.lock:
            stitcher.tick()
            await stitcher.flush()

    @app.timer(1.0)  # type: ignore[untyped-decorator,unused-ignore]
    @sup.guard("watchdog timer")
    async def watch() -> None:
        # Never takes the stitcher lock: it must run while a round or a ledger read waits.
        monitor.beat()
        stalled = watchdog.stalled()
        if stalled is not None:
            _stall(app, *stalled, settings.stall_timeout_s)

    @app.task  # type: ignore[untyped-decorator,unused-ignore]
    async def start_monitor() -> None:
        monitor.start()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type,unused-ignore]
    async def on_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        lease.revoke()  # a rebalance began: nothing is emitted until the new assignment
        if state["rebalance_since"] is None:
            state["rebalance_since"] = time.monotonic()
        async with stitcher.lock:
            stitcher.revoke([tp.partition for tp in revoked if tp.topic == settings.topic_chunks])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type,unused-ignore]
    async def on_assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        stitcher.preload([tp.partition for tp in assigned if tp.topic == settings.topic_chunks])

    @app.on_rebalance_complete.connect  # type: ignore[arg-type,unused-ignore]
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        if not state["assigned"]:
            _freeze_startup_objects(settings.gc_gen0_threshold)
            start_trimming(settings.malloc_trim_s)
        state["assigned"] = True
        state["rebalance_since"] = None
        log.info("rebalance complete", partitions=sorted(_assigned(app, settings)))

    @app.page("/healthz")
    class Healthz(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok", "worker": worker_id})

    @app.page("/readyz")
    class Readyz(View):
        async def get(self, request: Request) -> Response:
            waiting = watchdog.long_waits(min(5.0, settings.stall_timeout_s / 4))
            # died (a timer with a long period has simply not run yet: not counted)
            stopped = sorted(sup.dead())
            if stitcher.failure is not None:
                stopped.append(stitcher.failure_what)
            ready = bool(state["assigned"]) and not app.rebalancing and not waiting and not stopped
            body = {
                "ready": ready,
                "partitions": sorted(_assigned(app, settings)),
                "in_flight": sum(len(p.open) for p in stitcher.parts.values()),
                "waiting_for": waiting,
                "not_running": stopped,
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


def _freeze_startup_objects(gen0_threshold: int) -> None:
    """Move everything allocated while starting (modules, faust's services, the app) out of
    the collector's reach. Otherwise every full collection walks them again: a pause of
    tens of milliseconds on the hot path, which showed up directly in the p99 latency.
    Then raise the young-generation threshold: the batch path allocates CPython's default
    700 objects within a few records, and most of them die with their round."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info(
        "startup objects frozen for the garbage collector",
        objects=gc.get_freeze_count(),
        gen0_threshold=gen0_threshold,
    )


class _TPs(dict[int, Any]):
    """TopicPartition of the chunk topic by partition number, built on first use."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic

    def __missing__(self, partition: int) -> Any:
        from faust.types import TP

        tp = self[partition] = TP(self.topic, partition)
        return tp


def _stall(app: faust.App, what: str, seconds: float, limit: float) -> None:
    """A wait on the broker outlasted the stall timeout: stop the worker non-zero."""
    if getattr(app, "_chunkstitch_stalled", False):
        return
    app._chunkstitch_stalled = True  # type: ignore[attr-defined]
    log.critical(
        f"stopping the worker: waited {seconds:.0f}s for {what} "
        f"(CHUNKSTITCH_STALL_TIMEOUT_S={limit:g}); the orchestrator restarts it and "
        "unacknowledged records are replayed",
        waited_for=what,
    )
    _hard_exit_later(EXIT_STALLED, 15.0)
    task = asyncio.ensure_future(app.crash(RuntimeError(f"stalled waiting for {what}")))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def _hard_exit_later(code: int, after_s: float) -> None:
    """A clean stop may itself wait on the broker that stalled: end the process anyway."""
    import threading

    timer = threading.Timer(after_s, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _note_highwaters(app: faust.App, settings: Settings, stitcher: Stitcher) -> None:
    """Hand the stitcher each partition's fetch high watermark (lag-aware time rules) and
    set the consumer lag gauge: that high watermark minus the next offset to take."""
    try:
        consumer = app.consumer
        marks = {
            tp.partition: consumer.highwater(tp)
            for tp in consumer.assignment()
            if tp.topic == settings.topic_chunks
        }
    except Exception:  # the consumer is not started yet
        return
    stitcher.fetched(marks)
    for partition, highwater in marks.items():
        if highwater is not None:
            part = stitcher.parts.get(partition)
            taken = part.next_offset if part is not None and part.next_offset else 0
            metrics.LAG.labels(str(partition)).set(max(highwater - taken, 0))


def _stop_worker(
    app: faust.App,
    exc: BaseException,
    what: str = "a round of outputs could not be written; check the broker and the output topics",
) -> None:
    """Something the worker cannot go on without failed (outputs could not be made
    durable, the ledger could not be read, the batch path or the timer raised): stop the
    whole worker with an error so that it is restarted and replays from its last
    committed offsets. Carrying on would hold offsets forever and stall the partition."""
    if getattr(app, "_chunkstitch_stopping", False):
        return
    app._chunkstitch_stopping = True  # type: ignore[attr-defined]
    log.critical(
        f"stopping the worker: {what}; the orchestrator restarts it (unacknowledged "
        "records are replayed)",
        error=f"{type(exc).__name__}: {exc}",
    )
    _hard_exit_later(1, 15.0)
    task = asyncio.ensure_future(app.crash(exc))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def _assigned(app: faust.App, settings: Settings) -> set[int]:
    try:
        return {
            tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_chunks
        }
    except Exception:  # the consumer is not started yet
        return set()


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
