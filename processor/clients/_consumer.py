"""The downstream consumer: finished responses as typed ``topics.ChatCompletion`` objects.

At-least-once: a record's offset is committed only after the caller's loop body finished
with it (the next ``__anext__`` call, or ``close()``/leaving ``async with``). A body that
raises leaves its record uncommitted, so it is delivered again. The worker may emit an
identical response twice; duplicates by completion id within a bounded window are dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from processor.clients._errors import InvalidRecord
from processor.clients._kafka import connection_options, ensure_topic, start_client
from processor.clients._metrics import CONSUMER_SKIPPED
from processor.logs import get_logger
from processor.settings import Settings, get_settings
from topics._response import ChatCompletion, Status

__all__ = ["Consumer", "ConsumerStats", "StartPosition"]

log = get_logger(__name__)

StartPosition = Literal["committed", "earliest", "latest"]


@dataclass
class ConsumerStats:
    """Counters of one consumer."""

    yielded: int = 0
    invalid: int = 0
    duplicates: int = 0
    filtered: int = 0
    commits: int = 0


class Consumer:
    """``async for response in consumer:`` over the finished-response topic.

    * ``group_id``: consumer group (offsets committed there); ``None`` reads without a
      group and commits nothing.
    * ``start``: ``committed`` resumes from the group's committed offsets (``earliest``
      when the group has none); ``earliest``/``latest`` ignore committed offsets.
    * ``tenant`` / ``status``: only responses of that tenant / with one of those statuses.
    * ``idle_timeout_s``: stop iterating after this long without a new record.
    * ``raise_invalid``: raise :class:`InvalidRecord` for a record that does not validate
      (it is skipped and committed either way; the loop can continue).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        group_id: str | None = "chunkstitch-consumer",
        start: StartPosition = "committed",
        tenant: str | None = None,
        status: Status | Collection[Status] | None = None,
        topic: str | None = None,
        idle_timeout_s: float | None = None,
        raise_invalid: bool = False,
        dedupe_window: int | None = None,
        commit_interval_s: float | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic_responses
        self.group_id = group_id
        self.start_position = start
        self.tenant = tenant
        self.statuses: frozenset[str] | None = (
            None if status is None else frozenset([status] if isinstance(status, str) else status)
        )
        self.idle_timeout_s = idle_timeout_s
        self.raise_invalid = raise_invalid
        self.stats = ConsumerStats()
        self._window = (
            self.settings.consumer_dedupe_window if dedupe_window is None else dedupe_window
        )
        self._commit_interval = (
            self.settings.commit_interval_s if commit_interval_s is None else commit_interval_s
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._consumer: Any = None
        self._buffer: deque[Any] = deque()
        self._pending: Any = None  # record yielded, body not finished yet
        self._done: dict[Any, int] = {}  # tp -> next offset to commit
        self._committed: dict[Any, int] = {}
        self._last_commit = time.monotonic()
        self._positioned: set[Any] = set()
        self._waiter: Any = None  # ResponseWaiter, created by the first wait_for()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (fail fast with :class:`BrokerUnavailable`); check the topic exists."""
        s = self.settings
        reset = "latest" if self.start_position == "latest" else "earliest"
        self._consumer = AIOKafkaConsumer(
            **connection_options(s),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=reset,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            request_timeout_ms=max(int(s.session_timeout_s * 1000) + 5000, 10_000),
        )
        await start_client(self._consumer, s)
        try:
            topics = await asyncio.wait_for(self._consumer.topics(), s.connect_timeout_s)
            await ensure_topic(set(topics), self.topic, s)
        except BaseException:
            await self._consumer.stop()
            raise
        self._consumer.subscribe([self.topic], listener=_Listener(self))

    async def close(self) -> None:
        """Commit what the caller finished with, then disconnect.

        The response last yielded counts as finished (the caller closed normally, e.g.
        after ``break``); leaving ``async with`` by an exception does not commit it.
        """
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            await waiter.close()
        if self._consumer is None:
            return
        if self._pending is not None:
            self._mark_done(self._pending)
            self._pending = None
        try:
            await self._commit(force=True)
        finally:
            await self._consumer.stop()
            self._consumer = None

    async def wait_for(
        self,
        completion_id: str,
        timeout: float | None = 60.0,  # noqa: ASYNC109
        *,
        since: datetime | float | None = None,
    ) -> ChatCompletion:
        """The finished response of one completion id, for request/response callers.

        Reads only the partition the id hashes to, from the moment the wait starts (or
        from ``since``, e.g. the request's start, to also find a response that was
        finished before the call); commits nothing and does not disturb ``async for``.
        Raises :class:`WaitTimeout` after ``timeout`` seconds. See
        :class:`processor.clients.ResponseWaiter` (use it directly when you only wait).
        """
        if self._consumer is None:
            raise RuntimeError("the consumer is not started: use `async with Consumer(...)`")
        if self._waiter is None:
            from processor.clients._waiter import ResponseWaiter

            waiter = ResponseWaiter(self.settings, topic=self.topic)
            await waiter.start()
            self._waiter = waiter
        response: ChatCompletion = await self._waiter.wait_for(completion_id, timeout, since=since)
        return response

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None and self._pending is not None:
            self._pending = None  # the body failed with it: do not commit it
        await self.close()

    # --- iteration ----------------------------------------------------------------------
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatCompletion:
        if self._consumer is None:
            raise RuntimeError("the consumer is not started: use `async with Consumer(...)`")
        if self._pending is not None:
            self._mark_done(self._pending)
            self._pending = None
        while True:
            await self._commit()
            if not self._buffer and not await self._fetch():
                raise StopAsyncIteration
            record = self._buffer.popleft()
            response = self._accept(record)
            if response is not None:
                self._pending = record
                self.stats.yielded += 1
                return response
            self._mark_done(record)

    async def _fetch(self) -> bool:
        """Fill the buffer; False when ``idle_timeout_s`` passed with no record."""
        deadline = None if self.idle_timeout_s is None else time.monotonic() + self.idle_timeout_s
        while True:
            wait_ms = 500
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            batches = await self._consumer.getmany(timeout_ms=wait_ms, max_records=500)
            for records in batches.values():
                self._buffer.extend(records)
            if self._buffer:
                return True
            await self._commit()

    def _accept(self, record: Any) -> ChatCompletion | None:
        tp = _tp(record)
        if tp not in self._consumer.assignment():
            return None  # partition revoked meanwhile; its new owner reads it
        if record.value is None:
            return None  # compaction tombstone
        try:
            response = ChatCompletion.model_validate_json(record.value)
        except ValidationError as exc:
            self.stats.invalid += 1
            CONSUMER_SKIPPED.labels(reason="invalid").inc()
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            message = (
                f"record at {record.topic}/{record.partition}@{record.offset} is not a "
                f"finished response: {where}: {first['msg']}; skipped"
            )
            log.warning(
                "invalid_response_record",
                partition=record.partition,
                offset=record.offset,
                error=message,
            )
            if self.raise_invalid:
                self._mark_done(record)
                raise InvalidRecord(
                    message, partition=record.partition, offset=record.offset
                ) from None
            return None
        if self._window and response.id in self._seen:
            self.stats.duplicates += 1
            CONSUMER_SKIPPED.labels(reason="duplicate").inc()
            self._seen.move_to_end(response.id)
            return None
        if self._window:
            self._seen[response.id] = None
            if len(self._seen) > self._window:
                self._seen.popitem(last=False)
        meta = response.chunkstitch
        if (self.tenant is not None and meta.tenant != self.tenant) or (
            self.statuses is not None and meta.status not in self.statuses
        ):
            self.stats.filtered += 1
            return None
        return response

    # --- offsets ------------------------------------------------------------------------
    def _mark_done(self, record: Any) -> None:
        self._done[_tp(record)] = record.offset + 1

    async def _commit(self, *, force: bool = False) -> None:
        if self.group_id is None or self._consumer is None:
            return
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_interval:
            return
        self._last_commit = now
        assigned = self._consumer.assignment()
        offsets = {
            tp: off
            for tp, off in self._done.items()
            if tp in assigned and self._committed.get(tp) != off
        }
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit_failed", error=str(exc), offsets=len(offsets))
            return
        self._committed.update(offsets)
        self.stats.commits += 1

    async def _on_revoked(self, revoked: Collection[Any]) -> None:
        await self._commit(force=True)
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    async def _on_assigned(self, assigned: Collection[Any]) -> None:
        # earliest/latest position a partition the first time this consumer gets it;
        # after a rebalance hands it back, the group's committed offset is right.
        fresh = [tp for tp in assigned if tp not in self._positioned]
        self._positioned.update(fresh)
        if not fresh:
            return
        if self.start_position == "earliest":
            await self._consumer.seek_to_beginning(*fresh)
        elif self.start_position == "latest":
            await self._consumer.seek_to_end(*fresh)


def _tp(record: Any) -> Any:
    return TopicPartition(record.topic, record.partition)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner._on_assigned(assigned)
