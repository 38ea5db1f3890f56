"""The publisher for synchronous gateways (WSGI, threads: Flask, Django, the sync OpenAI client).

Design: one background thread runs an asyncio loop with the same :class:`Publisher` the
async gateways use (its aiokafka producer, delivery bookkeeping, metrics and error
reporting). Caller threads never wait for that loop on the hot path:

* ``send`` serializes the chunk in the caller's thread, takes a slot of a bounded,
  thread-safe buffer (``producer_buffer_max`` records, the same bound as the async
  publisher) and appends the record to an inbox; the loop is woken only when it is not
  already scheduled to drain the inbox, so a burst costs one wake-up, not one per chunk.
* A slot is freed when its record is acknowledged or has failed (a hook of the async
  publisher), so "buffered" means exactly what it means there.
* Fail-fast semantics are the async publisher's: ``start`` raises
  :class:`BrokerUnavailable` / :class:`UnknownTopic` within ``connect_timeout_s``;
  a full buffer makes ``send`` wait at most ``producer_buffer_wait_s``, then the record
  is counted and reported as failed (``buffer_full``); a record that cannot be delivered
  is given to ``on_error`` or, without a callback, raised by the next
  ``send``/``flush``/``stop``. ``on_error`` runs on the publisher's thread: keep it short
  and thread-safe.

Start it once per process, after any fork (gunicorn workers, not the pre-fork master),
and stop it at shutdown (``with SyncPublisher() as publisher``, or ``atexit``):
records still buffered when the process exits without ``stop()`` are lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from processor.clients._errors import PublishError
from processor.clients._publisher import (
    ErrorCallback,
    Publisher,
    PublisherStats,
    _Headers,
    _Record,
    _StreamState,
    stream_headers,
)
from processor.clients._serialize import to_value
from processor.logs import get_logger
from processor.settings import Settings
from topics._headers import HEADER_SEQ, EndReason

__all__ = ["SyncPublisher", "SyncStreamHandle"]

log = get_logger(__name__)


class SyncPublisher:
    """Thread-safe, blocking-API publisher (a context manager).

    >>> with SyncPublisher() as publisher:
    ...     with publisher.stream(tenant="acme", provider="openai") as s:
    ...         for chunk in client.chat.completions.create(..., stream=True):
    ...             s.send(chunk)
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        on_error: ErrorCallback | None = None,
        client_id: str = "chunkstitch-sync-publisher",
    ) -> None:
        self._pub = Publisher(settings, topic=topic, on_error=on_error, client_id=client_id)
        self.settings = self._pub.settings
        self.topic = self._pub.topic
        self._buffer_max = self.settings.producer_buffer_max
        self._cond = threading.Condition()
        self._inflight = 0  # records handed over and not yet delivered or failed
        self._inbox: deque[_Record] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()

    @property
    def stats(self) -> PublisherStats:
        """The counters of the underlying publisher (records = chunks + end markers)."""
        return self._pub.stats

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the publisher thread and connect; raises what ``Publisher.start`` raises
        (:class:`BrokerUnavailable`, :class:`UnknownTopic`), within the connect timeout."""
        with self._lifecycle:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_serve, args=(loop,), name="chunkstitch-publisher", daemon=True
            )
            thread.start()
            self._pub._settled = self._settled
            try:
                asyncio.run_coroutine_threadsafe(self._pub.start(), loop).result(
                    self._start_timeout()
                )
            except BaseException:
                _shutdown(loop, thread)
                raise
            self._loop, self._thread = loop, thread

    def stop(self) -> None:
        """Deliver what is buffered (bounded by the request timeout), stop the thread.

        Raises the first delivery error when no error callback was given.
        """
        with self._lifecycle:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop = self._thread = None
            try:
                asyncio.run_coroutine_threadsafe(self._stop(), loop).result()
            finally:
                _shutdown(loop, thread)
                self._lost_at_stop()

    def _lost_at_stop(self) -> None:
        """Records handed over by other threads after stop() drained the inbox: counted
        and reported as failed (the loop is gone; never lost silently)."""
        with self._cond:
            records = list(self._inbox)
            self._inbox.clear()
            self._scheduled = False
        pub = self._pub
        for key, _, _, seq in records:
            if seq is not None:
                pub.stats.chunks += 1
            pub.stats.accepted += 1
            pub._fail(PublishError("publisher stopped before sending"), key, seq)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record sent so far is acknowledged or failed."""
        loop = self._require_loop()
        wait = None if timeout is None else timeout + 1
        asyncio.run_coroutine_threadsafe(self._flush(timeout), loop).result(wait)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.stop()
            return
        try:
            self.stop()
        except PublishError as exc:
            log.error("publisher_stop_failed", error=str(exc))

    # --- streams ------------------------------------------------------------------------
    def stream(
        self,
        *,
        tenant: str | None = None,
        provider: str | None = None,
        request_started_at: datetime | float | None = None,
        completion_id: str | None = None,
        user: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> SyncStreamHandle:
        """A handle for one completion stream (use ``with``); see ``Publisher.stream``."""
        headers = stream_headers(
            tenant=tenant,
            provider=provider,
            request_started_at=request_started_at,
            user=user,
            attributes=attributes,
        )
        return SyncStreamHandle(self, headers, completion_id)

    # --- the caller's side (any thread) -------------------------------------------------
    def _put(self, record: _Record) -> None:
        pub = self._pub
        if pub._error is not None:
            pub._raise_pending()
        loop = self._loop
        if loop is None:
            raise PublishError(
                "the publisher is not started: use `with SyncPublisher(...)` or `publisher.start()`"
            )
        if threading.current_thread() is self._thread:
            raise PublishError(
                "SyncPublisher.send was called on the publisher's own thread (from an "
                "on_error callback?); publish from the gateway's threads only"
            )
        cond = self._cond
        with cond:
            if self._inflight >= self._buffer_max and not cond.wait_for(
                self._has_room, self.settings.producer_buffer_wait_s
            ):
                full = True
            else:
                full = False
                self._inflight += 1
                self._inbox.append(record)
                wake = not self._scheduled
                self._scheduled = True
        if full:
            self._call(self._buffer_full(record))
            return
        if wake:
            try:
                loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:  # the loop was closed by stop() meanwhile
                self._lost_at_stop()
                raise PublishError(
                    "the publisher was stopped while this record was being sent; "
                    "stop the publisher only after the gateway's streams ended"
                ) from None

    def _has_room(self) -> bool:
        return self._inflight < self._buffer_max

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._require_loop()).result()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise PublishError(
                "the publisher is not started: use `with SyncPublisher(...)` or `publisher.start()`"
            )
        return self._loop

    def _start_timeout(self) -> float:
        # Publisher.start is bounded by the connect timeout twice (start, metadata)
        return 2 * self.settings.connect_timeout_s + 10

    # --- the publisher's thread ---------------------------------------------------------
    def _drain_inbox(self) -> None:
        pub = self._pub
        with self._cond:
            self._scheduled = False
            records = list(self._inbox)
            self._inbox.clear()
        for record in records:
            seq = record[3]
            if seq is not None:
                pub.stats.chunks += 1
            pub.stats.accepted += 1
            pub._queue.append(record)
        wakeup = pub._wakeup
        if records and wakeup is not None and not wakeup.done():
            pub._wakeup = None
            wakeup.set_result(None)

    def _settled(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify()

    async def _buffer_full(self, record: _Record) -> None:
        key, _, _, seq = record
        pub = self._pub
        wait = self.settings.producer_buffer_wait_s
        exc = PublishError(
            f"publisher buffer full: {self._buffer_max} records waiting for the broker at "
            f"{self.settings.broker} for {wait:g} s; the broker is slow or unreachable "
            f"(raise CHUNKSTITCH_PRODUCER_BUFFER_MAX or CHUNKSTITCH_PRODUCER_BUFFER_WAIT_S)"
        )
        if seq is not None:
            pub.stats.chunks += 1
        pub.stats.accepted += 1
        pub._fail(exc, key, seq, reason="buffer_full", settle=False)
        pub._raise_pending()  # no error callback: the caller gets the error

    async def _flush(self, timeout: float | None) -> None:  # noqa: ASYNC109
        self._drain_inbox()
        await self._pub.flush(timeout)

    async def _stop(self) -> None:
        self._drain_inbox()
        await self._pub.stop()

    def _count_stream(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._inc_streams)

    def _inc_streams(self) -> None:
        self._pub.stats.streams += 1


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


class SyncStreamHandle(_StreamState):
    """One completion stream of a :class:`SyncPublisher` (use ``with``)."""

    def __init__(
        self, publisher: SyncPublisher, static_headers: _Headers, completion_id: str | None
    ) -> None:
        super().__init__(static_headers, completion_id)
        self._pub = publisher

    def send(self, chunk: Any) -> None:
        """Publish one chunk (dict, JSON bytes/str, or an object with ``model_dump``).

        Returns as soon as the record is buffered; waits only while the buffer is full.
        """
        key = self._key
        if key is not None and not self.closed:
            value = to_value(chunk)
            seq = self.count
            self.count = seq + 1
            self._pub._put((key, value, [(HEADER_SEQ, str(seq).encode()), *self._static], seq))
            return
        for record in self._records(chunk):
            self._pub._put(record)

    def close(self, reason: EndReason | None = None) -> None:
        """Send the end-of-stream marker (once). Default reason: done / closed."""
        if self.closed:
            return
        records = self._end_records(reason)
        self._pub._count_stream()
        for record in records:
            self._pub._put(record)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
            return
        try:
            self.close("aborted")
        except Exception as exc:  # never mask the caller's own exception
            log.error("end_marker_failed", completion_id=self.completion_id, error=str(exc))
