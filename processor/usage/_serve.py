"""``GET /usage`` off the stitching path: the read model and its own HTTP server.

faust's web server (``/healthz``, ``/readyz``, ``/metrics``) runs on the worker's event
loop, so every request it accepts, parses and answers is time the stitching loop does
not have. ``/usage`` is therefore served elsewhere: :class:`UsageService` is the rollup
consumer that keeps the :class:`~processor.usage._view.UsageView` up to date *and* an
aiohttp server on its own port (``CHUNKSTITCH_USAGE_PORT``), both on one event loop of
their own. It runs

* in a child process (``CHUNKSTITCH_USAGE_SERVER=process``, the default;
  :class:`ServiceProcess`): nothing of it shares the worker's interpreter lock; or
* in a thread of the worker (``thread``; :class:`ServiceThread`): one process, but its
  requests still take the worker's GIL (measured in the README).

Either way the worker supervises it: if the server cannot listen, or the thread or process
ends while the worker runs, one critical line says so, ``/readyz`` names it under
``not_running`` and the worker exits 1 (``processor.worker._supervise``). A child process
also ends when its worker does (its stdin is a pipe from the worker: EOF means the worker
is gone, even after kill -9).

The answers are the ones the worker's ``/usage`` gave: the bearer token
(``processor.web_auth``), the same :class:`~processor.usage._view.UsageQuery` validation
and one-line 400s, older ranges from PostgreSQL when ``CHUNKSTITCH_USAGE_DSN`` is set, 503
with ``Retry-After: 1`` while the view is still catching up, the same JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

import orjson
from aiohttp import web

from processor._malloc import start_trimming
from processor._procs import terminate
from processor._seek import Deadline, offsets_at
from processor.logs import configure_logging, get_logger
from processor.pricing import PRICE_DATA
from processor.settings import Settings
from processor.usage._cache import PageCache
from processor.usage._history import History
from processor.usage._view import (
    HOUR_MS,
    QueryError,
    UsageQuery,
    UsageView,
    _partitions,
    view_for,
)
from processor.web_auth import check_bearer

__all__ = [
    "ServiceProcess",
    "ServiceThread",
    "UsageServerFailed",
    "UsageService",
    "start_service",
]

log = get_logger("chunkstitch.usage")

EXIT_LISTEN = 2
"""Exit code of the usage server process when it cannot listen on its port."""


class UsageServerFailed(RuntimeError):
    """The usage server cannot run (or stopped); the message says why and what to do."""


class UsageService:
    """The rollup consumer and the ``/usage`` server, on the event loop that runs
    :meth:`run` (never the worker's)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.view: UsageView = view_for(settings)
        self.history = History(settings)
        self.cache = PageCache(settings.usage_cache_s)
        """Encoded pages of the view, by canonical query and view version."""
        self.error: str | None = None
        self.port: int | None = None
        """The port it listens on, once it does."""

    # --- HTTP ----------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/usage", self._usage)
        return app

    async def _usage(self, request: web.Request) -> web.Response:
        settings = self.settings
        denied = check_bearer(request.headers.get("Authorization"), settings.api_token)
        if denied is not None:
            return web.json_response(denied.body, status=denied.status, headers=denied.headers)
        params = dict(request.query)
        try:
            query = UsageQuery.parse(params, limit_max=settings.usage_query_limit_max)
        except QueryError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self.history.wanted(query.since_ms):  # beyond the live retention: PostgreSQL
            try:
                rows = await self.history.answer(
                    window=query.window,
                    by=query.by,
                    since_ms=query.since_ms,
                    until_ms=query.until_ms,
                    filters=query.filters(),
                    limit=query.limit,
                )
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            if rows is not None:
                return web.json_response(
                    {"rows": rows, "next_cursor": None, "price_data": PRICE_DATA}
                )
        page = await self._page(query, params)
        if page is None:
            return web.json_response(
                {"error": "the usage view is still reading the rollup topics; retry shortly"},
                status=503,
                headers={"Retry-After": "1"},
            )
        return web.Response(body=page, content_type="application/json")

    async def _page(self, query: UsageQuery, params: dict[str, str]) -> bytes | None:
        """The page as JSON (from the page cache while the view has not changed), or
        None if the view is still catching up after ``usage_view_wait_s``."""
        waited = 0.0
        while not self.view.caught_up:
            if waited >= self.settings.usage_view_wait_s:
                return None
            await asyncio.sleep(0.05)
            waited += 0.05
        # No await from here on: a page is looked up, computed and stored before any other
        # request runs (the rollup consumer too: it shares this loop), so identical
        # concurrent misses compute it once and the page is the one of `view.version`.
        view = self.view
        return self.cache.page(
            query.cache_key(params), view.version, lambda: _encode(view.query(query))
        )

    # --- running -------------------------------------------------------------------------

    async def run(self, stop: threading.Event) -> None:
        """Listen, then keep the view up to date until ``stop`` is set. Raises
        :class:`UsageServerFailed` when it cannot listen; a failing rollup read is
        retried (with a fresh view that answers 503 until it has caught up again)."""
        settings = self.settings
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        where = f"{settings.web_host}:{settings.usage_port}"
        site = web.TCPSite(runner, settings.web_host, settings.usage_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageServerFailed(
                f"cannot listen on {where} for /usage ({exc.strerror or exc}); pick a free "
                "port with CHUNKSTITCH_USAGE_PORT=N (distinct for several workers on a host)"
            ) from None
        self.port = settings.usage_port
        log.info("usage server listening", url=f"http://{where}/usage")
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    await self._consume(stop)
                except Exception as exc:  # a read failure must not take /usage down
                    self.error = f"{type(exc).__name__}: {exc}"
                    log.error(
                        "usage view: reading the rollup topics failed; retrying",
                        error=self.error,
                        retry_in_s=backoff,
                    )
                    await asyncio.to_thread(stop.wait, backoff)  # requests go on meanwhile
                    backoff = min(backoff * 2, 30.0)
                    self.view = view_for(settings)  # start over: 503 until caught up
                    self.cache.clear()  # the new view's versions start over
        finally:
            await runner.cleanup()
            await self.history.close()

    async def _seek_to_period(self, consumer: Any, parts: list[Any]) -> None:
        """Start each rollup partition at the first record written within the period the
        view keeps (plus a margin for windows still open when they were written), so
        that a restart reads what the view holds, not the topic's whole retention."""
        now = int(time.time() * 1000)
        since = {}
        for tp in parts:
            keep = (
                self.view.minute_keep_ms
                if tp.topic == self.settings.topic_rollups
                else self.view.hour_keep_ms
            )
            since[tp] = max(now - keep - min(keep, HOUR_MS), 0)
        # offsets_at asks the ends first: a rollup written meanwhile is read, never
        # skipped. The embedded broker answers offsets_for_times with the first offset,
        # which the search corrects (before, a restarted view read the topics whole there).
        stall = self.settings.usage_read_stall_s

        def stalled(what: str) -> TimeoutError:
            return TimeoutError(f"the broker returned nothing for {stall:.0f}s while {what}")

        starts = await offsets_at(consumer, since, Deadline(stall, stalled))
        for tp, offset in starts.items():
            consumer.seek(tp, offset)

    async def _consume(self, stop: threading.Event) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer: AIOKafkaConsumer = AIOKafkaConsumer(
            **self.settings.kafka_kwargs(),
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
        )
        await consumer.start()
        try:
            parts = _partitions(self.settings)
            consumer.assign(parts)
            view = self.view
            await self._seek_to_period(consumer, parts)
            targets: dict[Any, int] = {}
            began = time.monotonic()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=500, max_records=2000)
                for records in batch.values():
                    for i in range(0, len(records), 100):
                        view.apply_records((r.key, r.value) for r in records[i : i + 100])
                        await asyncio.sleep(0)  # let queries in between
                if not view.caught_up:
                    done = True
                    for tp in parts:
                        highwater = consumer.highwater(tp)
                        if highwater is None:
                            done = False
                            continue
                        target = targets.setdefault(tp, highwater)
                        if await consumer.position(tp) < target:
                            done = False
                    if done:
                        view.caught_up = True
                        log.info(
                            "usage view caught up",
                            records=view.records,
                            rows=view.size,
                            seconds=round(time.monotonic() - began, 2),
                        )
        finally:
            await consumer.stop()


def _encode(page: dict[str, Any]) -> bytes:
    """A page as compact JSON: orjson (about a tenth of json.dumps' time for a page of a
    few hundred rows, which is most of what a request costs), json where orjson refuses
    (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(page)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(page, separators=(",", ":")).encode()


class Service(Protocol):
    """What the worker starts, awaits and stops."""

    def start(self) -> None: ...

    async def wait_failed(self) -> None:
        """Return never while it runs; raise :class:`UsageServerFailed` when it stops
        without being asked to."""

    def stop(self) -> None: ...


class ServiceThread:
    """:class:`UsageService` in a daemon thread of the worker, on its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.service = UsageService(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-server", daemon=True)
        self._ended: concurrent.futures.Future[None] = concurrent.futures.Future()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self.service.run(self._stop))
        except UsageServerFailed as exc:
            _settle(self._ended, exc=exc)
            return
        except BaseException as exc:
            why = f"the usage server thread died ({type(exc).__name__}: {exc})"
            _settle(self._ended, exc=UsageServerFailed(why))
            return
        if self._stop.is_set():
            _settle(self._ended)
        else:
            _settle(self._ended, exc=UsageServerFailed("the usage server thread ended"))

    async def wait_failed(self) -> None:
        await asyncio.wrap_future(self._ended)
        if not self._stop.is_set():
            raise UsageServerFailed("the usage server thread ended")
        await asyncio.Event().wait()  # stopped on purpose: nothing more to report

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class ServiceProcess:
    """:class:`UsageService` in a child process (``python -m processor.usage``)
    with the worker's settings; its stdin is a pipe from the worker, its output the
    worker's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._ended: concurrent.futures.Future[int] = concurrent.futures.Future()

    def start(self) -> None:
        env = {**os.environ, **self.settings.to_env()}  # secrets go by environment only
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "processor.usage"], env=env, stdin=subprocess.PIPE
        )
        threading.Thread(target=self._watch, name="usage-server-watch", daemon=True).start()

    def _watch(self) -> None:
        assert self.proc is not None
        _settle(self._ended, self.proc.wait())

    async def wait_failed(self) -> None:
        code = await asyncio.wrap_future(self._ended)
        if not self._stopping:
            why = "it could not listen on its port" if code == EXIT_LISTEN else "see its log"
            raise UsageServerFailed(
                f"the usage server process (pid {self.proc.pid if self.proc else '?'}) "
                f"exited with {code}: {why}"
            )
        await asyncio.Event().wait()

    def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None:
            terminate(proc)


def _settle(
    future: concurrent.futures.Future[Any], result: Any = None, exc: BaseException | None = None
) -> None:
    """Complete ``future`` unless it is done already (cancelled: nobody waits for it)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def start_service(settings: Settings) -> Service:
    """The configured kind (``CHUNKSTITCH_USAGE_SERVER``), not started yet."""
    if settings.usage_server == "thread":
        return ServiceThread(settings)
    return ServiceProcess(settings)


def _main() -> None:
    """The child process: serve until SIGTERM or until the worker goes away."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.usage_server_nice:
        os.nice(settings.usage_server_nice)  # before any thread: they inherit it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the worker stops it

    def parent_gone() -> None:
        # EOF: the worker closed the pipe or died. os.read, not sys.stdin: a daemon
        # thread blocked in a buffered read aborts the interpreter's shutdown.
        while os.read(0, 4096):
            pass
        stop.set()

    threading.Thread(target=parent_gone, name="usage-server-parent", daemon=True).start()
    start_trimming(settings.malloc_trim_s, stop)
    try:
        asyncio.run(UsageService(settings).run(stop))
    except UsageServerFailed as exc:
        log.critical(f"usage server cannot run: {exc}")
        raise SystemExit(EXIT_LISTEN) from None
