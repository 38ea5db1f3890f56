"""Every place where chunkstitch reaches into faust-streaming's (and aiokafka's) private
internals. Tested with faust-streaming 0.15.3 and aiokafka 0.14 (pinned in pyproject.toml);
``tests/unit/test_faust_internals.py`` fails, naming the symbol, when one of them changes.

What is overridden, and why:

1. **Fetch wait** (``AIOKafkaConsumerThread._create_worker_consumer``). faust hard-codes
   ``fetch_max_wait_ms=1500``; a broker that answers a fetch only when that wait expires
   (the embedded broker) then adds up to 1.5 s to every completion. The wrapper sets the
   wait from ``CHUNKSTITCH_FETCH_MAX_WAIT_MS``.

2. **Batch ingestion** (``Consumer._drain_messages``). faust hands every record to its
   conductor one by one (``wait_first(callback(message), ...)``: several tasks and loop
   iterations, an Event, a Message, sensors and a stream queue per record), which cost
   about 80% of the worker's CPU. For the chunk topic only, :class:`BatchConsumer` takes
   each fetched batch as it comes from ``_wait_next_records`` and gives it to a
   :class:`BatchHandler` (the stitcher) as one round. It keeps what faust's loop does
   around that: flow control (no records while the flow is stopped for a rebalance), the
   generation check (a batch fetched before a rebalance is dropped), read offsets and gap
   tracking (so commits step over compacted or transactional gaps as faust does), and the
   ``broker_commit_every`` trigger. With ``CHUNKSTITCH_FETCH_AHEAD`` (:class:`_FetchAhead`)
   the next fetches are taken while a round runs, so that aiokafka fetches again at once;
   a fetch that began before a rebalance (``app.rebalancing_count``) or in another
   generation is dropped and every partition sought back. Acknowledgements go into faust's
   own commit bookkeeping (:func:`ack_offsets`, the same steps as ``Consumer.ack`` under
   ``ack_lock``), so faust's commit logic, commit interval and rebalance handling stay as
   they are. Records of every other topic (the usage agent's) take faust's ordinary
   per-message path.

3. **Membership lease** (``aiokafka``'s ``GroupCoordinator._send_req``). The stitcher
   emits only while the worker holds a lease that the group coordinator renewed: a
   heartbeat or SyncGroup answered without error, timed from when the request was *sent*
   (see docs/design.md, "Fencing"). aiokafka has no public hook for heartbeat results.

4. **Static group membership** (faust's public ``consumer_group_instance_id`` setting,
   plus aiokafka's ``GroupCoordinator._maybe_leave_group``/``close``). With
   ``CHUNKSTITCH_GROUP_INSTANCE_ID`` a worker restarting within the session timeout
   rejoins as the same member (KIP-345): no rebalance for the others. aiokafka sends no
   LeaveGroup for a static member, so a worker that stops cleanly would hold its
   partitions until its session expires; once the consumer has started, its
   coordinator's ``close()`` (run only on a clean stop) sends ``LeaveGroup(member_id)``,
   bounded by ``CHUNKSTITCH_GROUP_LEAVE_TIMEOUT_S``; a killed worker sends nothing. The
   embedded broker (Tansu 0.6.0) accepts instance ids but a static group of two never
   becomes stable on it, so the setting is off by default; on Apache Kafka >= 2.3 it works.
   Tansu starts generations at 0, where aiokafka's own ``> 0`` check never leaves: the
   override treats 0 as joined.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from processor.logs import get_logger
from processor.settings import Settings

__all__ = [
    "BatchConsumer",
    "BatchHandler",
    "MembershipLease",
    "ack_offsets",
    "install",
    "install_lease_hook",
    "install_static_membership",
    "resolve_instance_id",
]

log = get_logger("chunkstitch.worker")

FAUST_TESTED = ("0.15.3",)
AIOKAFKA_TESTED = ("0.14.0",)


# -- 1. fetch wait ---------------------------------------------------------------------
_fetch_wait: dict[str, int] = {}


def install_fetch_wait(wait_ms: int) -> None:
    """Make every faust worker consumer created from now on use ``wait_ms``."""
    from faust.transport.drivers import aiokafka as driver

    thread: Any = driver.AIOKafkaConsumerThread
    _fetch_wait["wait_ms"] = wait_ms
    if getattr(thread, "_chunkstitch_wrapped", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _fetch_wait["wait_ms"]
        return consumer

    thread._create_worker_consumer = create
    thread._chunkstitch_wrapped = True


# -- 2. batch ingestion ------------------------------------------------------------------
class BatchHandler(Protocol):
    """Who takes the chunk topic's batches (the worker's stitcher round)."""

    topic: str

    async def wait_for_lease(self) -> None:
        """Return once this member may take records (outside any lock)."""

    async def handle_batch(
        self,
        batch: Sequence[tuple[Any, Sequence[Any]]],
        current: Callable[[], bool],
        taken: Callable[[], None],
    ) -> bool:
        """One round: ``[(TopicPartition, [aiokafka ConsumerRecord, ...]), ...]``. Checks
        ``current()`` once it holds its lock and takes nothing (False) when the batch was
        fetched before a rebalance began; otherwise calls ``taken()`` still holding it."""

    def fetched(self, highwaters: Mapping[int, int | None]) -> None:
        """The fetch high watermarks of the partitions just fetched."""

    def crashed(self, exc: BaseException) -> None:
        """The batch path raised: the worker must stop (it cannot take records)."""


def ack_offsets(consumer: Any, tp: Any, offsets: Sequence[int]) -> None:
    """Acknowledge ``offsets`` of ``tp`` in faust's commit bookkeeping, in one step.

    The same steps as ``faust.transport.consumer.Consumer.ack`` for one message, for many
    offsets and without Message objects: only offsets at or above the committed one count,
    each once."""
    from faust.types.tuples import ack_lock
    from mode.utils.futures import notify

    with ack_lock:
        committed = consumer._committed_offset[tp]
        index = consumer._acked_index[tp]
        fresh = [o for o in offsets if (committed is None or o >= committed) and o not in index]
        if fresh:
            index.update(fresh)
            consumer._acked[tp].extend(fresh)
            consumer._n_acked += len(fresh)
        notify(consumer._waiting_for_ack)


class _FetchAhead:
    """Fetches the chunk topic's next records while the stitcher runs a round.

    aiokafka fetches a partition again only once its buffered records have been handed
    out, so with one fetch per round a record published during a long round waits for
    that round and for the next one too. This task keeps taking fetches (faust's
    ``_wait_next_records``, flow control included) into a buffer of at most about ``cap``
    records (one fetch more may land on top), which the drain loop takes whole for its
    next round. Each fetch is tagged with the rebalance and generation it began in; the
    drain loop drops the buffer and seeks back when a tag is not current. A fetch is never
    cancelled while the consumer runs: records it took from aiokafka would be lost until
    the next seek, so :meth:`pause` waits for the one in flight instead."""

    def __init__(self, consumer: Any, cap: int, tag: Callable[[], object]) -> None:
        self._consumer = consumer
        self._cap = cap
        self._tag = tag
        self._entries: list[tuple[object, Any, Any]] = []
        self._count = 0
        self._error: BaseException | None = None
        self._ready = asyncio.Event()  # something to take: entries, an empty fetch, an error
        self._room = asyncio.Event()  # the buffer is below cap
        self._room.set()
        self._running = asyncio.Event()  # not paused
        self._running.set()
        self._idle = asyncio.Event()  # no fetch in flight
        self._idle.set()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                await self._running.wait()
                await self._room.wait()
                consumer = self._consumer
                if not consumer.flow_active:
                    # faust's fetch waits for this too; the tag is taken after it, so the
                    # first fetch of a new assignment is current, not dropped as stale.
                    await consumer.wait(consumer.can_resume_flow)
                if not self._running.is_set():
                    continue
                tag = self._tag()
                self._idle.clear()
                try:
                    records, active = await self._consumer._wait_next_records(1.0)
                finally:
                    self._idle.set()
                if records and self._running.is_set():
                    n = sum(len(r) for r in records.values())
                    if n:
                        self._entries.append((tag, records, active))
                        self._count += n
                        if self._count >= self._cap:
                            self._room.clear()
                self._ready.set()
        except Exception as exc:  # handed to the drain loop, which raises it
            self._error = exc
            self._ready.set()

    async def take(self, tag: object) -> tuple[list[tuple[Any, Any]], bool]:
        """The fetches buffered so far (waiting for one), and whether any is stale."""
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        entries, self._entries = self._entries, []
        self._count = 0
        self._ready.clear()
        self._room.set()
        stale = any(t != tag for t, _, _ in entries)
        return [(records, active) for _, records, active in entries], stale

    async def pause(self) -> None:
        """Stop fetching, wait for the fetch in flight, drop what is buffered."""
        self._running.clear()
        await self._idle.wait()
        self._entries = []
        self._count = 0
        self._ready.clear()
        self._room.set()

    def resume(self) -> None:
        self._running.set()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _batch_consumer_class() -> type:
    from faust.transport.consumer import CONSUMER_FETCHING
    from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

    class _BatchConsumer(AIOKafkaConsumer):
        """faust's aiokafka consumer with a batch path for one topic (see the module doc)."""

        batch_handler: BatchHandler | None = None
        fetch_ahead: int = 0

        async def _drain_messages(self, fetcher: Any) -> None:
            handler = self.batch_handler
            if handler is None:
                await super()._drain_messages(fetcher)
                return
            try:
                await self._drain_batches(fetcher, handler)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    self.log.info("Broker stopped consumer, shutting down...")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    return
                raise
            except Exception as exc:
                handler.crashed(exc)
                raise

        async def _drain_batches(self, fetcher: Any, handler: BatchHandler) -> None:
            consumer_stopped = self._stopped.is_set
            fetcher_stopped = fetcher._stopped.is_set
            app = self.app
            ahead = (
                _FetchAhead(self, self.fetch_ahead, self._fetch_tag) if self.fetch_ahead else None
            )
            try:
                while not (consumer_stopped() or fetcher_stopped()):
                    self.diag.set_flag(CONSUMER_FETCHING)
                    stale = False
                    if ahead is None:
                        records, active = await self._wait_next_records(1.0)
                        entries = [] if records is None else [(records, active)]
                    else:
                        entries, stale = await ahead.take(self._fetch_tag())
                    generation = app.consumer_generation_id
                    await asyncio.sleep(0)
                    if self.should_stop:
                        continue
                    if stale or (not self.flow_active and (ahead is None or entries)):
                        # something fetched is dropped (an empty fetch ahead drops nothing)
                        log.info(
                            "fetched records dropped: a rebalance began; seeking back",
                            stale=stale,
                            flow_active=self.flow_active,
                        )
                        await self._reseek(ahead)
                        continue
                    if entries:
                        await self._handle_entries(entries, handler, generation)
                    commit_every = self._commit_every
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    self.diag.unset_flag(CONSUMER_FETCHING)
            finally:
                if ahead is not None:
                    await ahead.close()

        def _fetch_tag(self) -> tuple[int, int]:
            # A fetch is good only in the rebalance and generation it began in:
            # ``rebalancing_count`` moves at the first sign of a revocation (in the consumer
            # thread), ``consumer_generation_id`` at the assignment, before faust's recovery
            # seeks back to the committed offsets.
            return (self.app.rebalancing_count, self.app.consumer_generation_id)

        async def _reseek(self, ahead: _FetchAhead | None) -> None:
            # Records fetched are dropped and every partition sought back to its committed
            # offset, as faust's own getmany does when the flow is stopped; no fetch is in
            # flight during the seek, so none can return records from before it.
            # aiokafka's seek_to_committed leaves a partition without a committed offset
            # (or at 0) where it is, past the records just dropped, which would lose them:
            # those are sought to their beginning, where a new assignment would put them.
            if ahead is not None:
                await ahead.pause()
            try:
                await self.perform_seek()
                read_offset = self._read_offset
                fresh = [tp for tp in self.assignment() if not read_offset.get(tp)]
                if fresh:
                    from aiokafka import TopicPartition

                    await self._thread.seek_to_beginning(
                        *(TopicPartition(tp.topic, tp.partition) for tp in fresh)
                    )
                    for tp in fresh:
                        read_offset[tp] = None
            except Exception as exc:  # as faust's own getmany does
                self.log.warning(f"exception performing seek when flow not active {exc}")
            finally:
                if ahead is not None:
                    ahead.resume()

        async def _handle_entries(
            self,
            entries: list[tuple[Any, set[Any] | None]],
            handler: BatchHandler,
            generation: int,
        ) -> None:
            callback = self.callback
            read_offset = self._read_offset
            acks_enabled_for = self.app.topics.acks_enabled_for
            topic = handler.topic
            app = self.app
            highwaters: dict[int, int | None] = {}
            merged: dict[Any, list[Any]] = {}
            others: list[tuple[Any, Sequence[Any]]] = []
            # the last offset taken per partition, across the entries of this round
            lasts: dict[Any, int | None] = {}
            recs: Sequence[Any]
            for records, active in entries:
                for tp, recs in records.items():
                    if not recs or (
                        active is not None
                        and tp not in active
                        and tp not in self._buffered_partitions
                    ):
                        continue
                    # faust's read offset: the last offset taken, or after a seek the
                    # committed one (the next to take); like faust, take offset >= it.
                    last = lasts[tp] if tp in lasts else read_offset[tp]
                    if last is not None and recs[0].offset < last:
                        recs = [r for r in recs if r.offset >= last]
                        if not recs:
                            continue
                    first = recs[0].offset
                    if last is not None and first - last > 1 and acks_enabled_for(tp.topic):
                        await self._add_gap(tp, last + 1, first)
                    # gaps inside a batch (compaction, transaction markers)
                    if recs[-1].offset - first + 1 != len(recs) and acks_enabled_for(tp.topic):
                        prev = first
                        for r in recs[1:]:
                            if r.offset - prev > 1:
                                await self._add_gap(tp, prev + 1, r.offset)
                            prev = r.offset
                    lasts[tp] = recs[-1].offset
                    if tp.topic == topic:
                        if tp in merged:
                            merged[tp].extend(recs)
                        else:
                            merged[tp] = list(recs)
                        highwaters[tp.partition] = self.highwater(tp)
                    else:
                        others.append((tp, recs))
            if merged:
                batch: list[tuple[Any, Sequence[Any]]] = list(merged.items())
                handler.fetched(highwaters)
                await handler.wait_for_lease()

                def current(generation: int = generation) -> bool:
                    return app.consumer_generation_id == generation and self.flow_active

                def taken(batch: list[tuple[Any, Sequence[Any]]] = batch) -> None:
                    # Under the handler's lock: a revocation waits for that lock, and
                    # faust's seek to the committed offsets (which resets these) comes
                    # after the revocation, so no stale read offset survives it.
                    for tp, recs in batch:
                        read_offset[tp] = recs[-1].offset

                # Not current: a rebalance began; faust seeks every assigned partition
                # back to its committed offset after it, so these are fetched again.
                await handler.handle_batch(batch, current, taken)
            for tp, recs in others:
                for record in recs:
                    if app.consumer_generation_id != generation or not self.flow_active:
                        break
                    await self.wait_first(
                        callback(self._to_message(tp, record)), self.suspend_flow.wait()
                    )
                    read_offset[tp] = record.offset

    return _BatchConsumer


_classes: dict[str, type] = {}


def BatchConsumer() -> type:
    """The batch consumer class (built on first use: importing faust is slow)."""
    if "consumer" not in _classes:
        _classes["consumer"] = _batch_consumer_class()
    return _classes["consumer"]


def install_batch_consumer(app: Any, handler: BatchHandler, fetch_ahead: int = 0) -> None:
    """Make ``app`` build its consumer from :func:`BatchConsumer` feeding ``handler``;
    ``fetch_ahead`` > 0 fetches up to that many records ahead during a round."""
    cls = BatchConsumer()
    transport = app.transport

    def create_consumer(callback: Any, **kwargs: Any) -> Any:
        consumer = cls(transport, callback=callback, loop=transport.loop, **kwargs)
        consumer.batch_handler = handler
        consumer.fetch_ahead = fetch_ahead
        return consumer

    transport.create_consumer = create_consumer


# -- 3. membership lease -------------------------------------------------------------------
class MembershipLease:
    """Until when the group coordinator vouches for this member (monotonic clock).

    Renewed by a heartbeat or SyncGroup answered without error: the coordinator then
    keeps the member for at least a session timeout from when it *received* the request,
    which is after it was sent, so ``sent + fraction * session_timeout`` is a safe end.
    ``fraction`` is below 1 because some brokers complete a rebalance in about half a
    session timeout (the embedded broker does)."""

    def __init__(
        self,
        session_timeout_s: float,
        fraction: float = 0.4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.length_s = session_timeout_s * fraction
        self.clock = clock
        self.until = 0.0
        self.renewals = 0
        self.lost_at: float | None = clock()
        """When the lease last lapsed (``None`` while valid)."""
        self.held_at_revoke = False
        """Whether the lease was valid when the last :meth:`revoke` came: a revocation
        handler may still write what the member owned up to then (a last checkpoint)."""

    def renew(self, sent_at: float) -> None:
        until = sent_at + self.length_s
        if until > self.until:
            self.until = until
        self.renewals += 1

    def revoke(self) -> None:
        """A rebalance began or the member was fenced: no lease until renewed."""
        self.held_at_revoke = self.valid()
        self.until = 0.0

    def valid(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        ok = now < self.until
        if ok:
            self.lost_at = None
        elif self.lost_at is None:
            self.lost_at = now
        return ok


_leases: dict[str, MembershipLease] = {}


def install_lease_hook(group_id: str, lease: MembershipLease) -> None:
    """Renew ``lease`` from the answers the coordinator gives this process's group member
    ``group_id`` (aiokafka's ``GroupCoordinator._send_req``)."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.protocol.group import HeartbeatRequest, SyncGroupRequest

    _leases[group_id] = lease
    if getattr(GroupCoordinator, "_chunkstitch_lease", False):
        return
    original: Callable[[Any, Any], Awaitable[Any]] = GroupCoordinator._send_req
    watched = (HeartbeatRequest, SyncGroupRequest)

    async def send_req(self: Any, request: Any) -> Any:
        sent = time.monotonic()
        resp = await original(self, request)
        target = _leases.get(self.group_id)
        if target is not None and isinstance(request, watched):
            if getattr(resp, "error_code", None) == 0:
                target.renew(sent)
            else:
                target.revoke()
        return resp

    GroupCoordinator._send_req = send_req
    GroupCoordinator._chunkstitch_lease = True


# -- 4. static group membership -----------------------------------------------------------
_state: dict[str, float] = {"leave_timeout_s": 5.0}


def resolve_instance_id(value: str | None) -> str | None:
    """The configured instance id with ``{hostname}`` replaced; None (or empty) = off."""
    if not value:
        return None
    return value.replace("{hostname}", socket.gethostname())


def install_static_membership(app: Any, settings: Settings) -> None:
    """Give ``app``'s worker consumer the configured instance id (if any) and make it
    leave the group when it stops cleanly."""
    instance_id = resolve_instance_id(settings.group_instance_id)
    if instance_id is None:
        return
    app.conf.consumer_group_instance_id = instance_id
    _state["leave_timeout_s"] = settings.group_leave_timeout_s
    _wrap_consumer_factory()
    log.info("static group membership", group_instance_id=instance_id)


def _wrap_consumer_factory() -> None:
    from faust.transport.drivers import aiokafka as driver

    thread: Any = driver.AIOKafkaConsumerThread
    if getattr(thread, "_chunkstitch_static", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        start = consumer.start

        async def start_then_patch() -> None:
            await start()
            _leave_on_close(consumer._coordinator)

        consumer.start = start_then_patch
        return consumer

    thread._create_worker_consumer = create
    thread._chunkstitch_static = True


def _leave_on_close(coordinator: Any) -> None:
    """Make a clean ``close()`` of this coordinator send LeaveGroup for its static member."""
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.group import LeaveGroupRequest

    if coordinator is None or getattr(coordinator, "_chunkstitch_leave", False):
        return
    closing = {"now": False}
    original_close = coordinator.close
    original_leave = coordinator._maybe_leave_group

    async def close() -> None:
        closing["now"] = True
        await original_close()

    async def maybe_leave_group() -> None:
        # joined = a generation id >= 0 (aiokafka's "none" is -1; Kafka's first is 1 but
        # the embedded broker's is 0, where aiokafka's own "> 0" check never leaves)
        if not (closing["now"] and coordinator.generation >= 0 and coordinator.member_id):
            await original_leave()
            return
        request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
        try:
            response = await asyncio.wait_for(
                coordinator._send_req(request), _state["leave_timeout_s"]
            )
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "could not leave the consumer group on shutdown; the other workers take "
                "over this worker's partitions when its session times out",
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            log.info(
                "left the consumer group on shutdown",
                member_id=coordinator.member_id,
                error_code=getattr(response, "error_code", None),
            )
        coordinator.reset_generation()

    coordinator.close = close
    coordinator._maybe_leave_group = maybe_leave_group
    coordinator._chunkstitch_leave = True


def install(app: Any, handler: BatchHandler, lease: MembershipLease, settings: Settings) -> None:
    """Apply every override to ``app`` (before it starts)."""
    install_fetch_wait(settings.fetch_max_wait_ms)
    install_static_membership(app, settings)
    install_batch_consumer(app, handler, settings.batch_max if settings.fetch_ahead else 0)
    install_lease_hook(app.conf.id, lease)
