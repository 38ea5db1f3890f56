"""Wait for the finished response of ONE completion id (request/response callers).

A gateway that published a stream and wants its finished response back (to bill it, to
answer a non-streaming client, to check a tool call) calls
``await waiter.wait_for(completion_id, timeout=30)``. How it finds the record without
scanning the topic:

* **Which partition.** The worker writes each response keyed by its completion id with
  Kafka's default partitioner (murmur2 of the key, the same as the Java client and
  aiokafka), so the response of ``completion_id`` can only be on partition
  ``murmur2(id) % partitions``. Only that partition is read.
* **From when.** A waiter reads a partition from its end at the moment the first wait on
  it starts ("now"): the caller usually starts waiting before the response exists
  (right after the stream was published, or even before it ends). While any wait on a
  partition is open the partition is tailed; every response read there is kept for a
  short while (``recent`` ids), so a wait that starts just after its response went by
  on a partition already tailed still finds it. A partition nobody waits on is paused
  (not fetched).
* **Responses produced before the wait started.** Pass ``since=`` (the request's start,
  a datetime or epoch seconds): the partition is then read from the first record at or
  after that time (a ListOffsets by timestamp), so a response that was finished before
  the call is found too. Without ``since`` such a response is not seen and the call
  times out: call ``wait_for`` before (or while) the stream is published, or pass
  ``since``.
  (The embedded broker answers that ListOffsets with the partition's first offset:
  there ``since`` reads the partition from its start, correct but a scan.)
* **Duplicates.** The worker may emit an identical response twice (after a crash): the
  first one ends the wait. Several waits for the same id all get it.

The waiter never joins a consumer group and commits nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from processor.clients._errors import ClientError, WaitTimeout
from processor.clients._kafka import connection_options, ensure_topic, start_client
from processor.logs import get_logger
from processor.settings import Settings, get_settings
from topics._response import ChatCompletion

__all__ = ["ResponseWaiter", "partition_for"]

log = get_logger(__name__)


def partition_for(completion_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner puts the record keyed ``completion_id`` on."""
    from aiokafka.partitioner import murmur2

    hashed: int = murmur2(completion_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


class ResponseWaiter:
    """Waits for finished responses by completion id (an async context manager).

    One waiter serves any number of concurrent waits (one reader, one partition per id).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        recent: int = 10_000,
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic_responses
        self._recent_max = recent
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()  # key -> value, tailed only
        self._waits: dict[bytes, list[asyncio.Future[ChatCompletion]]] = {}
        self._active: dict[int, int] = {}  # partition -> open waits
        self._consumer: Any = None
        self._partitions = 0
        self._reader: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect (fail fast with :class:`BrokerUnavailable`); check the topic exists."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        s = self.settings
        consumer = AIOKafkaConsumer(
            **connection_options(s),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            # the embedded broker holds every fetch this long even when records wait;
            # Kafka answers at once: this bounds the latency a wait adds on Tansu
            fetch_max_wait_ms=50,
            request_timeout_ms=max(int(s.session_timeout_s * 1000) + 5000, 10_000),
        )
        await start_client(consumer, s)
        try:
            topics = await asyncio.wait_for(consumer.topics(), s.connect_timeout_s)
            await ensure_topic(set(topics), self.topic, s)
            partitions = consumer.partitions_for_topic(self.topic) or set()
            self._partitions = len(partitions)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.pause(*tps)  # nothing is fetched until somebody waits on a partition
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="cs-waiter")

    async def close(self) -> None:
        """Stop reading; open waits end with :class:`ClientError`."""
        if self._consumer is None:
            return
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for futures in self._waits.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(ClientError("the response waiter was closed"))
        self._waits.clear()
        await self._consumer.stop()
        self._consumer = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_for(
        self,
        completion_id: str,
        timeout: float | None = 60.0,  # noqa: ASYNC109
        *,
        since: datetime | float | None = None,
    ) -> ChatCompletion:
        """The finished response of ``completion_id`` (see the module docs for what is
        seen). Raises :class:`WaitTimeout` when none arrived within ``timeout`` seconds."""
        if self._consumer is None:
            raise RuntimeError("the waiter is not started: use `async with ResponseWaiter()`")
        key = completion_id.encode()
        partition = partition_for(completion_id, self._partitions)
        fut: asyncio.Future[ChatCompletion] = asyncio.get_running_loop().create_future()
        self._waits.setdefault(key, []).append(fut)
        try:
            seen = self._recent.get(key)
            if seen is not None:
                return ChatCompletion.model_validate_json(seen)
            await self._activate(partition, since)
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise WaitTimeout(
                    f"no finished response for completion {completion_id!r} on "
                    f"{self.topic}[{partition}] within {timeout:g} s; check that the "
                    f"worker runs and the stream ended (end marker), or wait longer"
                ) from None
        finally:
            futures = self._waits.get(key)
            if futures is not None:
                futures.remove(fut)
                if not futures:
                    del self._waits[key]
            await self._deactivate(partition)

    # --- internals ----------------------------------------------------------------------
    async def _activate(self, partition: int, since: datetime | float | None) -> None:
        from aiokafka import TopicPartition

        async with self._lock:
            tp = TopicPartition(self.topic, partition)
            count = self._active.get(partition, 0)
            self._active[partition] = count + 1
            since_ms = _epoch_ms(since)
            offset = end = None
            if since_ms is not None:
                # the end first: a response written between the two answers is then read
                end = (await self._consumer.end_offsets([tp]))[tp]
                found = await self._consumer.offsets_for_times({tp: since_ms})
                hit = found.get(tp)
                if hit is not None and hit.timestamp >= 0:
                    offset = hit.offset
            if count == 0:
                # an idle partition starts at its end ("now"), or at ``since``
                if offset is not None:
                    self._consumer.seek(tp, offset)
                elif end is not None:  # nothing since then: from the end taken before
                    self._consumer.seek(tp, end)
                else:
                    await self._consumer.seek_to_end(tp)
            elif offset is not None:
                # already tailed: go back only if ``since`` is before the current position
                position = await self._position(tp)
                if position is None or offset < position:
                    self._consumer.seek(tp, offset)
            if count == 0:
                self._consumer.resume(tp)
            self._wake.set()

    async def _position(self, tp: Any) -> int | None:
        with contextlib.suppress(Exception):
            position: int = await self._consumer.position(tp)
            return position
        return None

    async def _deactivate(self, partition: int) -> None:
        from aiokafka import TopicPartition

        async with self._lock:
            count = self._active.get(partition, 0) - 1
            if count > 0:
                self._active[partition] = count
                return
            self._active.pop(partition, None)
            if self._consumer is not None:
                self._consumer.pause(TopicPartition(self.topic, partition))

    async def _read(self) -> None:
        consumer = self._consumer
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
            except Exception as exc:  # keep serving: the next getmany retries
                log.warning("response_waiter_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self._take(record.key, record.value)

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None:
            return
        recent = self._recent
        recent[key] = value
        recent.move_to_end(key)
        if len(recent) > self._recent_max:
            recent.popitem(last=False)
        futures = self._waits.get(key)
        if not futures:
            return
        try:
            response = ChatCompletion.model_validate_json(value)
        except ValueError as exc:
            log.warning("invalid_response_record", key=key.decode(errors="replace"), error=str(exc))
            return
        for fut in futures:
            if not fut.done():
                fut.set_result(response)


def _epoch_ms(value: datetime | float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value * 1000)
