"""The gateway-side publisher: chunks in, records of the chunk topic out (record contract).

Hot path: :meth:`StreamHandle.send` serializes nothing it was given as bytes/str, builds
the headers, appends to a bounded in-memory buffer and returns; a background task hands
records to aiokafka. ``send`` only waits when the buffer is full (at most
``producer_buffer_wait_s``), and a record that cannot be delivered is counted and reported
(error callback, or raised by the next ``send``/``flush``/``stop``), never lost silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from processor.clients._errors import DeliveryError, PublishError
from processor.clients._kafka import connection_options, ensure_topic, start_client
from processor.clients._metrics import PUBLISHER_FAILED
from processor.clients._serialize import chunk_id, to_value
from processor.logs import get_logger
from processor.settings import Settings, get_settings
from topics._headers import (
    HEADER_END,
    HEADER_END_REASON,
    HEADER_SEQ,
    EndReason,
    RecordMeta,
    check_attribute_name,
    check_label,
    encode_headers,
)

__all__ = ["ErrorCallback", "Publisher", "PublisherStats", "StreamHandle", "stream_headers"]

ATTRIBUTES_MAX = 16
"""Most ``cs-attr-*`` headers on one stream (they ride on every chunk record)."""

log = get_logger(__name__)

ErrorCallback = Callable[[DeliveryError], None]
_Headers = list[tuple[str, bytes]]
_Record = tuple[bytes | None, bytes, _Headers, int | None]


@dataclass
class PublisherStats:
    """Counters of one publisher (records = chunks + end markers)."""

    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    chunks: int = 0
    streams: int = 0

    @property
    def buffered(self) -> int:
        """Records accepted but not yet acknowledged or failed."""
        return self.accepted - self.delivered - self.failed


def _epoch_ms(value: datetime | float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value * 1000)


def stream_headers(
    *,
    tenant: str | None,
    provider: str | None,
    request_started_at: datetime | float | None,
    user: str | None = None,
    attributes: Mapping[str, str] | None = None,
) -> _Headers:
    """The static headers of one stream; raises ``ValueError`` (one line) for a ``user``
    or attribute the worker would have to ignore."""
    if user is not None:
        if not isinstance(user, str):
            raise ValueError(f"user must be a string, got {type(user).__name__}")
        problem = check_label("user", user)
        if problem:
            raise ValueError(problem)
    attrs = dict(attributes or {})
    if len(attrs) > ATTRIBUTES_MAX:
        raise ValueError(f"{len(attrs)} attributes given; at most {ATTRIBUTES_MAX} per stream")
    for name, value in attrs.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"attribute {name!r}: names and values must be strings")
        problem = check_attribute_name(name) or check_label(f"attribute {name!r}", value)
        if problem:
            raise ValueError(problem)
    meta = RecordMeta(
        tenant=tenant,
        provider=provider,
        started_at_ms=_epoch_ms(request_started_at),
        user=user or None,
        attributes=tuple(sorted(attrs.items())),
    )
    return encode_headers(meta)


class Publisher:
    """Async publisher of chat.completion.chunk records (an async context manager).

    >>> async with Publisher() as publisher:
    ...     async with publisher.stream(tenant="acme", provider="openai") as s:
    ...         async for chunk in upstream:
    ...             await s.send(chunk)
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        on_error: ErrorCallback | None = None,
        client_id: str = "chunkstitch-publisher",
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic_chunks
        self.stats = PublisherStats()
        self._on_error = on_error
        self._client_id = client_id
        self._producer: Any = None
        self._sender: asyncio.Task[None] | None = None
        self._queue: deque[_Record] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._space_waiters: deque[asyncio.Future[None]] = deque()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._buffer_max = self.settings.producer_buffer_max
        self._error: DeliveryError | None = None
        self._running = False
        # Called (on the publisher's loop) once per queued record that was delivered or
        # failed; the SyncPublisher frees a slot of its thread-safe buffer there.
        self._settled: Callable[[], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (fail fast with :class:`BrokerUnavailable`) and check the topic exists."""
        from aiokafka import AIOKafkaProducer

        s = self.settings
        acks: str | int = "all" if s.producer_acks == "all" else int(s.producer_acks)
        self._producer = AIOKafkaProducer(
            **connection_options(s),
            client_id=self._client_id,
            acks=acks,
            linger_ms=s.producer_linger_ms,
            compression_type=None if s.producer_compression == "none" else s.producer_compression,
            request_timeout_ms=s.producer_request_timeout_ms,
            max_request_size=max(s.max_record_bytes, 1024 * 1024),
        )
        await start_client(self._producer, s)
        try:
            metadata = await asyncio.wait_for(
                self._producer.client.fetch_all_metadata(), s.connect_timeout_s
            )
            await ensure_topic(set(metadata.topics()), self.topic, s)
        except BaseException:
            await self._producer.stop()
            raise
        self._running = True
        self._sender = asyncio.get_running_loop().create_task(self._run(), name="cs-publisher")

    async def stop(self) -> None:
        """Deliver what is buffered (bounded by the request timeout), then disconnect.

        Raises the first delivery error when no error callback was given.
        """
        if self._producer is None:
            return
        try:
            await self.flush(self.settings.producer_request_timeout_ms / 1000 + 1)
        except PublishError:
            pass
        finally:
            self._running = False
            if self._sender is not None:
                self._sender.cancel()
                await asyncio.gather(self._sender, return_exceptions=True)
            while self._queue:
                key, _, _, seq = self._queue.popleft()
                self._fail(PublishError("publisher stopped before sending"), key, seq)
            await self._producer.stop()
            self._producer = None
        self._raise_pending()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            await self.stop()
            return
        try:
            await self.stop()
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
    ) -> StreamHandle:
        """A handle for one completion stream (use ``async with``).

        ``request_started_at`` is a datetime or Unix epoch seconds. ``completion_id`` is
        only needed when the chunks themselves carry no id; otherwise the first chunk's
        id becomes the record key. ``user`` (header ``cs-user``) and ``attributes``
        (``cs-attr-<name>``, e.g. ``{"feature": "search"}``) are usage dimensions: values
        printable, at most 256 bytes; names ``[a-z][a-z0-9_]*``, at most 32 characters.
        A bad one raises ``ValueError``. The worker keeps only the attribute names in
        ``CHUNKSTITCH_USAGE_ATTRIBUTES``.
        """
        headers = stream_headers(
            tenant=tenant,
            provider=provider,
            request_started_at=request_started_at,
            user=user,
            attributes=attributes,
        )
        return StreamHandle(self, headers, completion_id)

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every accepted record is acknowledged or failed."""
        if self.stats.buffered > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise PublishError(
                    f"{self.stats.buffered} record(s) still unacknowledged after {timeout:g} s "
                    f"by the broker at {self.settings.broker}; check the broker"
                ) from None
        self._raise_pending()

    # --- internals ----------------------------------------------------------------------
    async def _put(
        self, key: bytes | None, value: bytes, headers: _Headers, seq: int | None
    ) -> None:
        if self._error is not None:
            self._raise_pending()
        if not self._running:
            raise PublishError(
                "the publisher is not started: use `async with Publisher(...)` "
                "or `await publisher.start()`"
            )
        stats = self.stats
        if (
            stats.accepted - stats.delivered - stats.failed >= self._buffer_max
            and not await self._wait_for_space(key, seq)
        ):
            return  # reported to the error callback and counted
        stats.accepted += 1
        self._queue.append((key, value, headers, seq))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)

    async def _wait_for_space(self, key: bytes | None, seq: int | None) -> bool:
        """Wait for room; False (after reporting the record as failed) when none came."""
        wait = self.settings.producer_buffer_wait_s
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._space_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, wait)
        except TimeoutError:
            exc = PublishError(
                f"publisher buffer full: {self._buffer_max} records waiting for the broker at "
                f"{self.settings.broker} for {wait:g} s; the broker is slow or unreachable "
                f"(raise CHUNKSTITCH_PRODUCER_BUFFER_MAX or CHUNKSTITCH_PRODUCER_BUFFER_WAIT_S)"
            )
            self.stats.accepted += 1
            self._fail(exc, key, seq, reason="buffer_full", settle=False)
            self._raise_pending()  # no error callback: the caller gets the error
            return False
        return True

    async def _run(self) -> None:
        producer = self._producer
        topic = self.topic
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._wakeup = loop.create_future()
                await self._wakeup
                continue
            key, value, headers, seq = queue.popleft()
            try:
                fut = await producer.send(topic, value, key=key, headers=headers)
            except asyncio.CancelledError:
                queue.appendleft((key, value, headers, seq))
                raise
            except Exception as exc:
                self._fail(exc, key, seq)
                self._release()
                continue
            fut.add_done_callback(lambda f, k=key, s=seq: self._delivered(f, k, s))

    def _delivered(self, fut: asyncio.Future[Any], key: bytes | None, seq: int | None) -> None:
        if fut.cancelled():
            self._fail(PublishError("send cancelled"), key, seq)
        elif (exc := fut.exception()) is not None:
            self._fail(exc, key, seq)
        else:
            self.stats.delivered += 1
            if self._settled is not None:
                self._settled()
        self._release()

    def _release(self) -> None:
        stats = self.stats
        buffered = stats.accepted - stats.delivered - stats.failed
        while self._space_waiters and buffered < self._buffer_max:
            waiter = self._space_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if buffered == 0 and self._drain_waiters:
            for waiter in self._drain_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._drain_waiters.clear()

    def _fail(
        self,
        exc: BaseException,
        key: bytes | None,
        seq: int | None,
        reason: str | None = None,
        *,
        settle: bool = True,
        store: bool = True,
    ) -> None:
        self.stats.failed += 1
        if settle and self._settled is not None:
            self._settled()
        what = "end marker" if seq is None else f"chunk seq={seq}"
        err = DeliveryError(
            f"{what} of completion {key.decode(errors='replace') if key else '?'} was not "
            f"delivered to topic {self.topic!r} at {self.settings.broker}: "
            f"{type(exc).__name__}: {exc}",
            key=key,
            seq=seq,
            cause=exc,
        )
        PUBLISHER_FAILED.labels(reason=reason or type(exc).__name__).inc()
        log.error("publish_failed", topic=self.topic, seq=seq, error=str(err))
        if self._on_error is not None:
            try:
                self._on_error(err)
            except Exception as cb_exc:
                log.error("publisher_error_callback_failed", error=repr(cb_exc))
        elif store and self._error is None:
            self._error = err

    def _raise_pending(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise err


class _StreamState:
    """What both stream handles share: numbering, keying, held placeholders, end marker.

    Pure bookkeeping: it turns chunks into records (key, value, headers, seq) and leaves
    handing them over to the async or sync publisher to the subclass.
    """

    def __init__(self, static_headers: _Headers, completion_id: str | None) -> None:
        self._static = static_headers
        self.completion_id = completion_id
        self._key: bytes | None = completion_id.encode() if completion_id else None
        self._held: list[tuple[bytes, int]] = []
        self.count = 0
        self.saw_done = False
        self.closed = False
        self.started_at = time.time()

    def _records(self, chunk: Any) -> list[_Record]:
        """The records to publish for ``chunk`` (none while an id-less chunk is held)."""
        if self.closed:
            raise PublishError("this stream is closed; open a new one with publisher.stream()")
        value = to_value(chunk)
        seq = self.count
        self.count = seq + 1
        key = self._key
        if key is None:
            cid = chunk_id(chunk, value)
            if cid is None:  # Azure placeholder (id ""), or no id yet: hold it
                self._held.append((value, seq))
                return []
            self.completion_id = cid
            self._key = key = cid.encode()
            return [*self._take_held(key), self._record(key, value, seq)]
        return [self._record(key, value, seq)]

    def _record(self, key: bytes | None, value: bytes, seq: int) -> _Record:
        return (key, value, [(HEADER_SEQ, str(seq).encode()), *self._static], seq)

    def _take_held(self, key: bytes | None) -> list[_Record]:
        held, self._held = self._held, []
        return [self._record(key, value, seq) for value, seq in held]

    def _end_records(self, reason: EndReason | None) -> list[_Record]:
        """The records that close the stream: its end marker (or, when no id ever came,
        the held chunks without a key). Empty when already closed."""
        if self.closed:
            return []
        self.closed = True
        reason = reason or ("done" if self.saw_done else "closed")
        if self._key is None:
            if self._held:
                # No id ever arrived: publish what we have without a key (never drop it);
                # the worker routes by the chunk's own id or dead-letters it with a reason.
                log.warning("stream_without_id", chunks=len(self._held), reason=reason)
            return self._take_held(None)
        headers = [
            (HEADER_END, str(self.count).encode()),
            (HEADER_END_REASON, reason.encode()),
            *self._static,
        ]
        return [(self._key, b"", headers, None)]

    def mark_done(self) -> None:
        """The upstream sent ``[DONE]``: the end marker will say ``done``."""
        self.saw_done = True


class StreamHandle(_StreamState):
    """One completion stream: numbers chunks, keys them, sends the end marker on exit."""

    def __init__(
        self, publisher: Publisher, static_headers: _Headers, completion_id: str | None
    ) -> None:
        super().__init__(static_headers, completion_id)
        self._pub = publisher

    async def send(self, chunk: Any) -> None:
        """Publish one chunk (dict, JSON bytes/str, or an object with ``model_dump``)."""
        key = self._key
        if key is not None and not self.closed:  # the hot path: no list, no id lookup
            value = to_value(chunk)
            seq = self.count
            self.count = seq + 1
            self._pub.stats.chunks += 1
            await self._pub._put(key, value, [(HEADER_SEQ, str(seq).encode()), *self._static], seq)
            return
        for record in self._records(chunk):
            self._pub.stats.chunks += 1
            await self._pub._put(*record)

    async def close(self, reason: EndReason | None = None) -> None:
        """Send the end-of-stream marker (once). Default reason: done / closed."""
        if self.closed:
            return
        records = self._end_records(reason)
        pub = self._pub
        pub.stats.streams += 1
        for record in records:
            if record[3] is not None:
                pub.stats.chunks += 1
            await pub._put(*record)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            await self.close()
            return
        try:
            await self.close("aborted")
        except Exception as exc:  # never mask the caller's own exception
            log.error("end_marker_failed", completion_id=self.completion_id, error=str(exc))
