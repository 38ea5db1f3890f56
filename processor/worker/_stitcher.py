"""The worker's logic: records in, finished responses / dead letters / ledger out.

Independent of faust: the app hands it whole fetched batches (:meth:`Stitcher.handle_batch`,
one round each) or single records with a ``release`` callback (:meth:`Stitcher.handle`),
and gives it a ``send`` function (produce, returning a delivery future) and an ``acker``
(acknowledge source offsets of a partition, in order). See docs/design.md, "Worker state
design" for why acks are held and released in order, and "Fencing" for the lease that
gates every output and time rule.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from processor import metrics
from processor.core import (
    Assembler,
    ChunkRejected,
    Decision,
    DetectionPolicy,
    StreamClock,
    decide,
    parse_chunk,
)
from processor.logs import get_logger
from processor.pricing import costs
from processor.settings import Settings
from processor.worker._ledger import read_ledger
from topics import (
    DEADLETTER_VALUE_MAX,
    HEADER_END,
    HEADER_REROUTED,
    HEADER_SEQ,
    HEADER_STARTED_AT,
    ChatCompletion,
    ChunkstitchMeta,
    CompletionChoice,
    CompletionMessage,
    CompletionUsage,
    DeadLetter,
    DeadLetterReason,
    HeaderError,
    RecordMeta,
    SourceRange,
    Status,
    decode_headers,
)
from topics._headers import (
    HEADER_ATTR_PREFIX,
    HEADER_USER,
    KEY_MAX_BYTES,
    plausible_started_at,
)

__all__ = ["AckFn", "Lease", "Record", "SendFn", "Stitcher"]

log = get_logger("chunkstitch.worker")

SendFn = Callable[
    [str, bytes | None, bytes | None, int | None, list[tuple[str, bytes]] | None],
    Awaitable[Awaitable[Any]],
]
"""``send(topic, key, value, partition, headers)`` -> awaitable delivery future."""

AckFn = Callable[[int, list[int]], None]
"""``ack(partition, offsets)``: acknowledge source offsets (ascending) of a partition."""


class Lease(Protocol):
    """The worker's membership lease (see :class:`processor.worker._faust.MembershipLease`)."""

    def valid(self, now: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp_ms: int | None


@dataclass(slots=True)
class _Open:
    """A completion being assembled."""

    cid: str
    asm: Assembler
    clock: StreamClock
    offsets: list[int]
    first_ts: int | None
    last_ts: int | None
    finished_ts: int | None = None
    """Record timestamp when every choice was first seen finished (event-time usage grace)."""
    tenant: str | None = None
    provider: str | None = None
    started_ms: int | None = None
    started_ignored: bool = False
    """An implausible ``cs-started-at`` was ignored (logged once per stream)."""
    user: str | None = None
    attributes: dict[str, str] | None = None
    labels_seen: bool = False
    """The ``cs-user`` / ``cs-attr-*`` headers were taken (from the first record that had
    any): later records carry the same static headers, so they are not checked again."""


@dataclass(slots=True)
class _Partition:
    held: deque[tuple[int, Callable[[], None] | None]] = field(default_factory=deque)
    """Source offsets taken and not yet acknowledged, in order (``None``: ack via acker)."""
    done: set[int] = field(default_factory=set)
    open: dict[str, _Open] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)
    """completion id -> highest last source offset recorded for it (emitted ids)."""
    emitted: deque[tuple[float, str, int]] = field(default_factory=deque)
    """(when emitted, worker clock; completion id; offset) in emission order: expiry."""
    loaded: bool = False
    highwater: int | None = None
    """The partition's end as the last fetch response reported it."""
    next_offset: int | None = None
    """The offset after the last record taken."""
    stream_time_ms: int | None = None
    """The latest record timestamp taken: the partition's own clock while it has lag."""

    @property
    def lagging(self) -> bool:
        """Records are waiting in the partition beyond what was taken."""
        return (
            self.highwater is not None
            and self.next_offset is not None
            and self.highwater > self.next_offset
        )


_NEVER = float("-inf")
"""A worker-clock ``now`` under which no wall-clock time rule holds."""


@dataclass(frozen=True, slots=True)
class _Side:
    """A dead letter or re-route: sent at :meth:`Stitcher.flush`, done once durable."""

    partition: int
    offset: int
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


@dataclass(slots=True)
class _Emission:
    partition: int
    stream: _Open
    body: bytes
    status: str
    rule: str


class Stitcher:
    """Per-partition assembly state, completion detection and emission."""

    def __init__(
        self,
        settings: Settings,
        send: SendFn,
        clock: Callable[[], float],
        worker_id: str = "worker",
        *,
        acker: AckFn | None = None,
        lease: Lease | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.send = send
        self.clock = clock
        self.worker_id = worker_id
        self.acker = acker
        self.lease = lease
        """Outputs and time rules only while it is valid; ``None``: always (unit tests)."""
        self.wall_clock = wall_clock
        self.topic = settings.topic_chunks
        self._attribute_caps = settings.usage_attribute_caps
        self._dropped_logged: set[str] = set()
        self.policy = DetectionPolicy(
            usage_grace_s=settings.usage_grace_s,
            idle_timeout_s=settings.idle_timeout_s,
            max_lifetime_s=settings.max_lifetime_s,
            max_chunks=settings.max_chunks,
            max_bytes=settings.max_bytes,
        )
        self.parts: dict[int, _Partition] = {}
        self._emit: list[_Emission] = []
        self._side: list[_Side] = []
        """Dead letters and re-routes of this round, sent when it is sealed."""
        self._rounds: list[asyncio.Task[None]] = []
        """Sealed rounds whose outputs are not durable yet, oldest first."""
        self._round_started: list[float] = []
        self.max_rounds_in_flight = 8
        self.failure: BaseException | None = None
        """The first error that kept a round from becoming durable; the worker stops."""
        self.on_failure: Callable[[BaseException], None] | None = None
        self.failure_what = "a round of outputs could not be made durable; check the broker"
        """What failed, for the worker's last log line."""
        self.lock = asyncio.Lock()
        self._loading: dict[int, asyncio.Task[None]] = {}
        self._generation: dict[int, int] = {}

    # -- partitions -----------------------------------------------------------------------
    async def _partition(self, partition: int) -> _Partition:
        while True:
            part = self.parts.get(partition)
            if part is None:
                part = self.parts[partition] = _Partition()
            if part.loaded:
                return part
            # A load started before a revoke is discarded; then this starts a fresh one.
            await (self._loading.get(partition) or self.preload([partition]))

    def preload(self, partitions: Sequence[int]) -> asyncio.Task[None]:
        """Start reading the ledger of newly assigned partitions (all in one pass); the
        first record of a partition waits for it. Called on assignment so that this read
        is not on the first completion's path."""
        todo = [p for p in partitions if p not in self._loading and not self._loaded(p)]
        generations = {p: self._generation.get(p, 0) for p in todo}
        task = asyncio.ensure_future(self._load_ledgers(generations))
        for p in todo:
            self._loading[p] = task
        return task

    def _loaded(self, partition: int) -> bool:
        part = self.parts.get(partition)
        return part is not None and part.loaded

    async def _load_ledgers(self, generations: dict[int, int]) -> None:
        """Fold the ledger of the partitions into fresh state batch by batch as it is read,
        then install it; a partition revoked meanwhile is dropped (and no longer read): a
        later assignment loads it afresh."""
        partitions = list(generations)
        # Only the period the ledger is used for (plus a minute of clock skew).
        since_ms = int((self.wall_clock() - self.settings.emitted_memory_s - 60) * 1000)
        staged = {p: _Partition() for p in partitions}

        def wanted(p: int) -> bool:
            if p in staged and self._generation.get(p, 0) != generations[p]:
                del staged[p]  # revoked meanwhile: what it folded so far is of no use
            return p in staged

        def fold(p: int, records: list[Any]) -> None:
            if wanted(p):
                self._fold_ledger(p, staged[p], records)

        try:
            await read_ledger(
                self.settings,
                partitions,
                since_ms,
                fold,
                wanted=wanted,
                stall_s=self.settings.stall_timeout_s,
            )
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._fail(exc, "the ledger of newly assigned partitions could not be read")
            raise
        finally:
            for p in partitions:
                self._loading.pop(p, None)
        for p in partitions:
            if not wanted(p):
                continue
            part = self.parts.get(p)
            if part is None:
                part = self.parts[p] = _Partition()
            if not part.loaded:  # nothing writes to a partition's ledger before it is loaded
                part.ledger, part.emitted = staged[p].ledger, staged[p].emitted
                part.loaded = True
                log.info("ledger loaded", partition=p, entries=len(part.ledger))

    def _fold_ledger(self, partition: int, part: _Partition, records: Sequence[Any]) -> None:
        """Fold ledger records into ``part``, in offset order (the emitted memory expires
        oldest first). An id keeps the HIGHEST offset recorded for it, whoever wrote it
        last (a stale worker's late write must not move it back)."""
        now = self.clock()
        wall_ms = self.wall_clock() * 1000
        ledger = part.ledger
        for rec in records:
            if rec.key is None or rec.value is None:
                continue  # tombstones are compaction's business: an id once emitted stays
            cid = rec.key.decode("utf-8", "replace")
            try:
                offset = int(rec.value)
            except ValueError:
                log.warning(
                    "ignoring a ledger record that is not an offset",
                    partition=partition,
                    offset=rec.offset,
                    value=rec.value[:40].decode("utf-8", "replace"),
                )
                continue
            known = ledger.get(cid)
            if known is None or offset > known:
                ledger[cid] = offset
            age_s = max(wall_ms - rec.timestamp, 0) / 1000 if rec.timestamp else 0.0
            part.emitted.append((now - age_s, cid, offset))

    def revoke(self, partitions: Sequence[int]) -> None:
        """Forget revoked partitions: their new owner rebuilds them from the log. Outputs
        of theirs not sent yet are dropped (the new owner emits them); rounds already sent
        never release their acks (see :meth:`_current`)."""
        gone = set(partitions)
        for partition in partitions:
            self._generation[partition] = self._generation.get(partition, 0) + 1
            part = self.parts.pop(partition, None)
            if part is not None:
                log.info("partition revoked", partition=partition, open=len(part.open))
        if gone:
            self._emit = [e for e in self._emit if e.partition not in gone]
            self._side = [s for s in self._side if s.partition not in gone]
        self._update_gauge()

    # -- records ------------------------------------------------------------------------
    async def handle(self, rec: Record, release: Callable[[], None] | None = None) -> None:
        """Take one record; its ack is held until everything it fed is durable, then
        ``release()`` is called (or, without one, the acker with its offset).

        A record that makes the stitcher itself fail becomes an ``internal_error`` dead
        letter: one bad record must never stop the worker."""
        part = await self._partition(rec.partition)
        self._take(part, rec, release)
        metrics.CHUNKS.inc()

    async def handle_batch(
        self,
        batch: Sequence[tuple[Any, Sequence[Any]]],
        current: Callable[[], bool] = lambda: True,
        taken: Callable[[], None] = lambda: None,
    ) -> bool:
        """One round from one fetch: ``[(TopicPartition, [ConsumerRecord, ...]), ...]``,
        each partition's records in offset order; their acks go through the acker. The
        round is sealed at the end. Takes nothing (returns False) when ``current()`` is
        false once the lock is held: the batch was fetched before a rebalance began.
        ``taken()`` is called under the lock once the records are taken."""
        async with self.lock:
            if not current():
                return False
            count = 0
            for tp, records in batch:
                partition = tp.partition
                part = await self._partition(partition)
                topic = tp.topic
                take = self._take
                for r in records:
                    take(
                        part,
                        Record(topic, partition, r.offset, r.key, r.value, r.headers, r.timestamp),
                        None,
                    )
                count += len(records)
            metrics.CHUNKS.inc(count)
            taken()
            await self.flush()
        return True

    def crashed(self, exc: BaseException) -> None:
        """The batch path that feeds this stitcher raised: stop the worker."""
        log.error("the batch path failed", error=f"{type(exc).__name__}: {exc}")
        self._fail(exc, "the batch path that takes the chunk records failed")

    def fetched(self, highwaters: Mapping[int, int | None]) -> None:
        """The fetch high watermarks of partitions (for the lag-aware time rules)."""
        for partition, highwater in highwaters.items():
            part = self.parts.get(partition)
            if part is not None and highwater is not None:
                part.highwater = highwater

    async def wait_for_lease(self) -> None:
        """Return once the membership lease is valid (at once without a lease)."""
        lease = self.lease
        if lease is None or lease.valid():
            return
        # The lease is renewed from faust's consumer thread (another event loop): poll.
        while not lease.valid():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def _take(self, part: _Partition, rec: Record, release: Callable[[], None] | None) -> None:
        part.held.append((rec.offset, release))
        part.next_offset = rec.offset + 1
        ts = rec.timestamp_ms
        # A producer clock far ahead must not make every stream of a lagging partition idle
        # at once: stream time never runs ahead of this worker's clock (+1 min).
        if (
            ts is not None
            and ts > 0
            and (part.stream_time_ms is None or ts > part.stream_time_ms)
            and ts <= self.wall_clock() * 1000 + 60_000
        ):
            part.stream_time_ms = ts
        try:
            self._handle(part, rec)
        except Exception as exc:
            log.exception("record failed", partition=rec.partition, offset=rec.offset)
            self._dead(rec, "internal_error", f"{type(exc).__name__}: {exc}")

    def _handle(self, part: _Partition, rec: Record) -> None:
        try:
            meta = decode_headers(rec.headers)
        except HeaderError as exc:
            self._dead(rec, "bad_header", str(exc))
            return
        value = rec.value or b""
        if len(value) > self.settings.max_record_bytes:
            self._dead(
                rec,
                "oversize",
                f"record of {len(value)} bytes exceeds max_record_bytes="
                f"{self.settings.max_record_bytes}",
            )
            return
        if rec.key is not None and len(rec.key) > KEY_MAX_BYTES:
            self._dead(
                rec,
                "oversize",
                f"record key of {len(rec.key)} bytes exceeds {KEY_MAX_BYTES} (the key is the "
                "completion id)",
            )
            return
        cid = rec.key.decode("utf-8", "replace") if rec.key else None
        problem = self._header_limits(meta)
        if problem is not None:
            self._dead(rec, "bad_header", problem, cid)
            return
        if meta.is_end_marker and not value:
            self._end_marker(part, rec, meta, cid)
            return
        try:
            chunk = parse_chunk(value)
        except ChunkRejected as exc:
            self._dead(rec, exc.reason, str(exc), cid)  # type: ignore[arg-type]
            return
        if cid is None:
            if not chunk.id:
                self._dead(rec, "no_id", "record has no key and the chunk has no usable 'id'")
                return
            if len(chunk.id.encode()) > KEY_MAX_BYTES:
                self._dead(rec, "oversize", f"chunk 'id' exceeds {KEY_MAX_BYTES} bytes")
                return
            self._reroute(rec, chunk.id)
            return
        last = part.ledger.get(cid)
        if last is not None:
            if rec.offset <= last:
                metrics.REPLAY_SKIPPED.inc()
                part.done.add(rec.offset)
            else:
                self._dead(rec, "late_chunk", f"completion {cid!r} was already emitted", cid)
            return
        stream = part.open.get(cid)
        now = self.clock()
        if stream is None:
            stream = part.open[cid] = _Open(
                cid,
                Assembler(cid),
                StreamClock(opened_at=now, last_chunk_at=now, sequenced=meta.seq is not None),
                [],
                rec.timestamp_ms,
                rec.timestamp_ms,
            )
        stream.offsets.append(rec.offset)  # first: a stream in ``open`` always has an offset
        self._note_meta(stream, meta, rec.timestamp_ms)
        stream.last_ts = rec.timestamp_ms if rec.timestamp_ms is not None else stream.last_ts
        stream.clock.last_chunk_at = now
        if not stream.asm.add(chunk, meta.seq, len(value)):
            pass  # a duplicate: dropped by the assembler, counted in its metadata
        if stream.asm.all_choices_finished and stream.clock.finished_at is None:
            stream.clock.finished_at = now
            stream.finished_ts = rec.timestamp_ms
        self._check(rec.partition, part, stream, now)

    def _note_meta(self, stream: _Open, meta: RecordMeta, record_ts_ms: int | None) -> None:
        if meta.tenant and not stream.tenant:
            stream.tenant = meta.tenant
        if meta.provider and not stream.provider:
            stream.provider = meta.provider
        started = meta.started_at_ms
        if started is not None and stream.started_ms is None:
            if plausible_started_at(started, record_ts_ms):
                stream.started_ms = started
            else:
                # Never the stream's event time: it would move the usage fold's stream time
                # (every later completion of the partition counted late) or overflow dates.
                metrics.HEADERS_IGNORED.labels(HEADER_STARTED_AT).inc()
                if not stream.started_ignored:
                    stream.started_ignored = True
                    log.warning(
                        "ignoring an implausible cs-started-at header (before 2000 or more "
                        "than a day after the record's timestamp); fix the gateway's clock "
                        "or send epoch milliseconds",
                        completion_id=stream.cid,
                        started_at_ms=started,
                        record_timestamp_ms=record_ts_ms,
                    )
        if meta.seq is not None:
            stream.clock.sequenced = True
        if not stream.labels_seen and (meta.user or meta.attributes or meta.ignored):
            self._note_labels(stream, meta)

    def _note_labels(self, stream: _Open, meta: RecordMeta) -> None:
        """User and the allowlisted attributes of a stream (once). A ``cs-user`` /
        ``cs-attr-*`` header that is not valid, or an attribute not in the allowlist, is
        ignored: counted (once per completion) and logged; the chunk itself is fine, so
        it is never dead-lettered for a label."""
        stream.labels_seen = True
        stream.user = meta.user
        allowed = self._attribute_caps
        kept = {name: value for name, value in meta.attributes if name in allowed}
        stream.attributes = kept or None
        dropped = [name for name, _ in meta.attributes if name not in allowed]
        for header, problem in meta.ignored:
            label = HEADER_USER if header == HEADER_USER else HEADER_ATTR_PREFIX + "*"
            metrics.HEADERS_IGNORED.labels(label).inc()
            log.warning(
                "ignoring a usage label header that is not valid; fix the publisher",
                completion_id=stream.cid,
                header=header[:64],
                problem=problem,
            )
        if dropped:
            metrics.HEADERS_IGNORED.labels(HEADER_ATTR_PREFIX + "*").inc(len(dropped))
            if len(self._dropped_logged) < 100 and not self._dropped_logged.issuperset(dropped):
                self._dropped_logged.update(dropped)
                log.warning(
                    "ignoring attribute headers not in CHUNKSTITCH_USAGE_ATTRIBUTES (add "
                    "them there to carry them; logged once per name)",
                    completion_id=stream.cid,
                    attributes=sorted(dropped)[:16],
                )

    def _header_limits(self, meta: RecordMeta) -> str | None:
        """What is wrong with a sequence number or chunk count that no completion within
        the per-completion limits can have (dead-lettered at once instead of waiting for
        the idle timeout), or ``None``."""
        limit = self.settings.max_chunks
        if meta.seq is not None and meta.seq >= limit:
            return (
                f"header {HEADER_SEQ!r} is {meta.seq}, beyond max_chunks={limit} (sequence "
                "numbers are 0-based and a completion holds at most max_chunks chunks)"
            )
        if meta.end_count is not None and meta.end_count > limit:
            return (
                f"header {HEADER_END!r} is {meta.end_count}, beyond max_chunks={limit} (raise "
                "CHUNKSTITCH_MAX_CHUNKS if completions really are that long)"
            )
        return None

    def _end_marker(self, part: _Partition, rec: Record, meta: RecordMeta, cid: str | None) -> None:
        if cid is None:
            self._dead(rec, "orphan_end_marker", "end-of-stream marker without a key")
            return
        if cid in part.ledger:
            part.done.add(rec.offset)  # the completion was emitted already: nothing to add
            return
        stream = part.open.get(cid)
        if stream is None:
            self._dead(
                rec,
                "orphan_end_marker",
                f"end-of-stream marker for unknown completion {cid!r}",
                cid,
            )
            return
        self._note_meta(stream, meta, rec.timestamp_ms)
        stream.offsets.append(rec.offset)
        stream.clock.end_count = meta.end_count
        stream.clock.end_reason = meta.end_reason
        self._check(rec.partition, part, stream, self.clock())

    def _check(
        self,
        partition: int,
        part: _Partition,
        stream: _Open,
        now: float,
        event_now_s: float | None = None,
    ) -> None:
        """Emit the stream if a detection rule says so. Guarded: a stream whose detection,
        assembly or serialization fails is emitted as an ``error`` response plus an
        ``internal_error`` dead letter (:meth:`_failed`), and is ledgered like any other,
        so its replay is skipped; no other stream is affected."""
        try:
            decision = decide(stream.asm, stream.clock, now, self.policy)
            if decision is None and event_now_s is not None:
                decision = self._decide_by_event_time(stream, event_now_s)
            if decision is None:
                return
            body, status = self._build(partition, stream, decision.status, decision.reason)
            rule = decision.rule
        except Exception as exc:
            body, status, rule = self._failed(partition, stream, exc), "error", "internal_error"
        del part.open[stream.cid]
        known = part.ledger.get(stream.cid)
        if known is None or stream.offsets[-1] > known:
            part.ledger[stream.cid] = stream.offsets[-1]
        part.emitted.append((now, stream.cid, stream.offsets[-1]))
        self._emit.append(_Emission(partition, stream, body, status, rule))

    def _build(
        self, partition: int, stream: _Open, status: Status | None, reason: str | None
    ) -> tuple[bytes, str]:
        """The finished response of a stream, serialized, and its status."""
        response = stream.asm.finish(status=status, reason=reason, expected=stream.clock.end_count)
        self._fill_meta(response.chunkstitch, response.provider, partition, stream)
        meta = response.chunkstitch  # cost: reported, else estimated (processor/pricing.py)
        meta.cost_reported, meta.cost_estimated, meta.price_data = costs(response)
        body = response.to_json()
        if len(body) > self.settings.max_response_bytes:
            body = self._too_large(response, len(body), partition)
            if len(body) > self.settings.max_response_bytes:
                body = self._bare(response, len(body))
        return body, response.chunkstitch.status

    def _bare(self, response: ChatCompletion, size: int) -> bytes:
        """Still too large without its message bodies (unknown fields of the chunks, tool
        calls, a huge model name or header): only what tells downstream how it ended. A
        record over the topic's limit would fail its round, stop the worker and fail
        again on every replay."""
        limit = self.settings.max_response_bytes
        meta = response.chunkstitch
        meta.reason = (
            f"response of {size} bytes exceeds max_response_bytes={limit} even without its "
            "message bodies: unknown fields, tool calls and usage details dropped too"
        )
        usage = response.usage
        bare = ChatCompletion(
            id=response.id,
            created=response.created,
            model=response.model[:256],
            choices=[
                CompletionChoice(
                    index=c.index,
                    message=CompletionMessage(role=c.message.role[:64]),
                    finish_reason=(c.finish_reason or "")[:64] or None,
                )
                for c in response.choices
            ],
            usage=None
            if usage is None
            else CompletionUsage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            chunkstitch=meta,
        )
        body = bare.to_json()
        if len(body) > limit:  # thousands of choices, or headers of a megabyte
            last = ChunkstitchMeta(
                status="error",
                reason=meta.reason,
                chunk_count=meta.chunk_count,
                source=meta.source,
            )
            body = ChatCompletion(id=response.id[:256], chunkstitch=last).to_json()
        return body

    def _fill_meta(
        self, meta: ChunkstitchMeta, provider: str | None, partition: int, stream: _Open
    ) -> None:
        """The worker's part of the metadata: headers, record timestamps, source range."""
        meta.tenant = stream.tenant
        meta.provider = stream.provider or provider
        meta.user = stream.user
        meta.attributes = stream.attributes
        meta.request_started_at_ms = stream.started_ms
        meta.first_chunk_at_ms = stream.first_ts
        meta.last_chunk_at_ms = stream.last_ts
        if stream.started_ms is not None and stream.first_ts is not None:
            meta.time_to_first_chunk_ms = max(stream.first_ts - stream.started_ms, 0)
        start = stream.started_ms if stream.started_ms is not None else stream.first_ts
        if start is not None and stream.last_ts is not None:
            meta.duration_ms = max(stream.last_ts - start, 0)
        meta.source = SourceRange(
            topic=self.settings.topic_chunks,
            partition=partition,
            first_offset=stream.offsets[0],
            last_offset=stream.offsets[-1],
        )

    def _failed(self, partition: int, stream: _Open, exc: Exception) -> bytes:
        """A stream the worker's own code could not finish: an ``internal_error`` dead
        letter (referencing its offsets; the chunks stay in the chunk topic) and, as its
        response, an ``error`` with the metadata that can still be built."""
        first, last = stream.offsets[0], stream.offsets[-1]
        error = f"{type(exc).__name__}: {exc}"[:300]
        reason = f"internal error while assembling the completion: {error}"
        log.error(
            "completion could not be assembled; emitted as an error response",
            completion_id=stream.cid,
            partition=partition,
            offset=last,
            error=error,
        )
        self._dead(
            Record(
                self.settings.topic_chunks,
                partition,
                last,
                stream.cid.encode(),
                b"",
                (),
                stream.last_ts,
            ),
            "internal_error",
            f"completion {stream.cid!r} could not be assembled ({error}); it was emitted as "
            f"an error response; its chunks are offsets {first}..{last} of partition "
            f"{partition} of {self.settings.topic_chunks} (report this as a chunkstitch bug)",
            stream.cid,
        )
        try:
            asm = stream.asm
            meta = ChunkstitchMeta(
                status="error",
                reason=reason,
                chunk_count=asm.chunk_count,
                duplicates_dropped=asm.duplicates_dropped,
                missing_chunks=asm.missing_chunks,
                usage_reported=asm.usage_reported,
            )
            self._fill_meta(meta, None, partition, stream)
            return ChatCompletion(id=stream.cid, chunkstitch=meta).to_json()
        except Exception:  # the last resort: id, status and reason only
            return json.dumps(
                {
                    "id": stream.cid,
                    "object": "chat.completion",
                    "created": 0,
                    "model": "",
                    "choices": [],
                    "chunkstitch": {"status": "error", "reason": reason},
                }
            ).encode()

    def _decide_by_event_time(self, stream: _Open, event_now_s: float) -> Decision | None:
        """The time rules judged by the partition's own clock (its latest record
        timestamp) instead of the worker's: used while the partition has lag, where the
        wall clock says nothing about whether a stream's next chunk is waiting unread."""
        if stream.first_ts is None or stream.last_ts is None:
            return None
        clock = stream.clock
        eclock = StreamClock(
            opened_at=stream.first_ts / 1000,
            last_chunk_at=stream.last_ts / 1000,
            finished_at=stream.finished_ts / 1000 if stream.finished_ts is not None else None,
            end_count=clock.end_count,
            end_reason=clock.end_reason,
            sequenced=clock.sequenced,
        )
        return decide(stream.asm, eclock, event_now_s, self.policy)

    def _too_large(self, response: ChatCompletion, size: int, partition: int) -> bytes:
        """A response too large for one record is emitted without its message bodies, with
        status ``error`` and the reason, so that downstream still learns how it ended."""
        limit = self.settings.max_response_bytes
        meta = response.chunkstitch
        meta.status = "error"
        meta.reason = (
            f"response of {size} bytes exceeds max_response_bytes={limit}: message bodies "
            "dropped (raise CHUNKSTITCH_MAX_RESPONSE_BYTES with the topic's max.message.bytes)"
        )
        for choice in response.choices:
            choice.message = type(choice.message)(role=choice.message.role)
        log.warning(
            "response too large; emitted without its message bodies",
            completion_id=response.id,
            partition=partition,
            bytes=size,
            limit=limit,
        )
        metrics.OVERSIZE_RESPONSES.inc()
        return response.to_json()

    def _dead(
        self, rec: Record, reason: DeadLetterReason, message: str, cid: str | None = None
    ) -> None:
        value = rec.value or b""
        letter = DeadLetter(
            reason=reason,
            message=message,
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
            source_timestamp_ms=rec.timestamp_ms,
            key_b64=DeadLetter.b64(rec.key),
            value_b64=DeadLetter.b64(value[:DEADLETTER_VALUE_MAX]) or "",
            value_size=len(value),
            value_truncated=len(value) > DEADLETTER_VALUE_MAX,
            headers=[(k, base64.b64encode(v or b"").decode()) for k, v in rec.headers],
            completion_id=cid,
            worker=self.worker_id,
        )
        log.warning(
            "dead letter",
            reason=reason,
            detail=message,
            completion_id=cid,
            partition=rec.partition,
            offset=rec.offset,
        )
        metrics.DEAD_LETTERS.labels(reason).inc()
        self._side.append(
            _Side(
                rec.partition,
                rec.offset,
                self.settings.topic_deadletter,
                rec.key,
                letter.model_dump_json().encode(),
                None,
            )
        )

    def _reroute(self, rec: Record, cid: str) -> None:
        headers = [
            *rec.headers,
            (HEADER_REROUTED, f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
        ]
        self._side.append(
            _Side(rec.partition, rec.offset, rec.topic, cid.encode(), rec.value, headers)
        )

    # -- time ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply the time-based rules (idle timeout, usage grace, lifetime) to every stream.

        Only while the membership lease is valid: a worker that may have lost its
        partitions (paused, cut off) judges nothing by time until the coordinator vouches
        for it again or the partitions are revoked. A partition with lag (records waiting
        beyond those taken, e.g. catching up on a backlog) is judged by its own record
        timestamps, never by the wall clock: its next chunk may be among those waiting."""
        now = self.clock()
        self._expire_ledger(now)
        if self.lease is not None and not self.lease.valid():
            return
        for partition, part in self.parts.items():
            if not part.open:
                continue
            if part.lagging:
                if part.stream_time_ms is None:
                    continue
                event_now = part.stream_time_ms / 1000
                for stream in list(part.open.values()):
                    try:
                        self._check(partition, part, stream, _NEVER, event_now)
                    except Exception as exc:  # _check is guarded; this keeps the loop going
                        self._abandon(partition, part, stream, exc)
                continue
            for stream in list(part.open.values()):
                try:
                    self._check(partition, part, stream, now)
                except Exception as exc:  # _check is guarded; this keeps the loop going
                    self._abandon(partition, part, stream, exc)

    def _expire_ledger(self, now: float) -> None:
        """Forget emitted ids older than ``emitted_memory_s`` (oldest first, O(expired))."""
        horizon = now - self.settings.emitted_memory_s
        for part in self.parts.values():
            emitted, ledger = part.emitted, part.ledger
            while emitted and emitted[0][0] < horizon:
                _, cid, offset = emitted.popleft()
                if ledger.get(cid) == offset:
                    del ledger[cid]

    def _abandon(self, partition: int, part: _Partition, stream: _Open, exc: Exception) -> None:
        """The last line of the timer path: a stream whose error response could not even be
        recorded is dropped (its offsets are released so the partition does not stall) with
        an error log line and, when possible, an ``internal_error`` dead letter."""
        part.open.pop(stream.cid, None)
        part.done.update(stream.offsets)
        log.error(
            "completion dropped: the worker could not even emit it as an error",
            completion_id=stream.cid,
            partition=partition,
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
        try:
            last = stream.offsets[-1]
            self._dead(
                Record(
                    self.settings.topic_chunks, partition, last, stream.cid.encode(), b"", (), None
                ),
                "internal_error",
                f"completion {stream.cid!r} was dropped after an internal error "
                f"({type(exc).__name__}); its chunks end at offset {last} of partition {partition}",
                stream.cid,
            )
        except Exception:
            metrics.DEAD_LETTERS.labels("internal_error").inc()

    # -- durability -----------------------------------------------------------------------
    async def flush(self) -> None:
        """Seal this round: its responses, dead letters and re-routes are sent now; making
        them durable, writing the ledger and releasing source offsets in order happen in
        the background (:meth:`drain` waits for that), so the next records are taken while
        this round's acknowledgements are in flight. At most ``max_rounds_in_flight``
        rounds are pending; beyond that this waits for the oldest.

        Fenced: while the membership lease is not valid nothing is sent; the round's
        outputs stay pending until the lease is renewed (then the next flush sends them)
        or their partitions are revoked (then they are dropped: the new owner emits them).

        Raises the error of a round that could not be made durable: nothing after it may
        be released, and the worker must stop (its records are replayed on restart)."""
        self._raise_failure()
        if not self._emit and not self._side:
            self.release()  # records done on arrival (replays, end markers of emitted ones)
            return
        if self.lease is not None and not self.lease.valid():
            return
        emissions, self._emit = self._emit, []
        side, self._side = self._side, []
        send, responses = self.send, self.settings.topic_responses
        deliveries = [
            await send(responses, e.stream.cid.encode(), e.body, None, None) for e in emissions
        ]
        deliveries += [await send(x.topic, x.key, x.value, None, x.headers) for x in side]
        generations = {e.partition: self._generation.get(e.partition, 0) for e in emissions}
        for x in side:
            generations[x.partition] = self._generation.get(x.partition, 0)
        task = asyncio.ensure_future(self._settle(emissions, side, deliveries, generations))
        self._rounds.append(task)
        self._round_started.append(self.clock())
        task.add_done_callback(self._round_done)
        while len(self._rounds) > self.max_rounds_in_flight:
            await asyncio.wait([self._rounds[0]])
            self._raise_failure()

    async def drain(self) -> None:
        """Wait until every sealed round is durable and released; raise a round's error."""
        while self._rounds:
            await asyncio.wait([self._rounds[0]])
        self._raise_failure()

    @property
    def rounds_in_flight(self) -> int:
        return len(self._rounds)

    def oldest_round_age(self, now: float) -> float:
        """How long the oldest sealed round has waited for its acknowledgements."""
        return now - self._round_started[0] if self._round_started else 0.0

    def _round_done(self, task: asyncio.Task[None]) -> None:
        index = self._rounds.index(task)
        del self._rounds[index]
        del self._round_started[index]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.failure is None:
            log.error(
                "could not make a round of outputs durable; stopping: its source records "
                "stay unacknowledged and are replayed when the worker restarts",
                error=f"{type(exc).__name__}: {exc}",
            )
            self._fail(exc)

    def _fail(self, exc: BaseException, what: str | None = None) -> None:
        """Something the worker cannot go on without failed: stop it (``on_failure``)."""
        if self.failure is None:
            self.failure = exc
            if what:
                self.failure_what = what
            if self.on_failure is not None:
                self.on_failure(exc)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _settle(
        self,
        emissions: list[_Emission],
        side: list[_Side],
        deliveries: list[Awaitable[Any]],
        generations: dict[int, int],
    ) -> None:
        await asyncio.gather(*deliveries)
        # The ledger entry is written only once the response is durable: a ledger entry
        # for a response that was lost would skip that completion after a restart.
        ledger = [
            await self.send(
                self.settings.topic_ledger,
                e.stream.cid.encode(),
                str(e.stream.offsets[-1]).encode(),
                e.partition,
                None,
            )
            for e in emissions
        ]
        await asyncio.gather(*ledger)
        for e in emissions:
            metrics.COMPLETIONS.labels(e.status, e.rule).inc()
            log.info(
                "completion emitted",
                completion_id=e.stream.cid,
                partition=e.partition,
                offset=e.stream.offsets[-1],
                status=e.status,
                rule=e.rule,
                chunks=e.stream.asm.chunk_count,
            )
            part = self._current(e.partition, generations)
            if part is not None:
                part.done.update(e.stream.offsets)
        for x in side:
            part = self._current(x.partition, generations)
            if part is not None:
                part.done.add(x.offset)
        self.release()

    def _current(self, partition: int, generations: dict[int, int]) -> _Partition | None:
        """The partition's state if it was not revoked since the round was sealed: a new
        owner (or a new assignment here) replays those records itself."""
        if self._generation.get(partition, 0) != generations[partition]:
            return None
        return self.parts.get(partition)

    def release(self) -> None:
        """Ack every held record at the head of each partition whose work is done."""
        acker = self.acker
        for partition, part in self.parts.items():
            held, done = part.held, part.done
            batch: list[int] = []
            while held and held[0][0] in done:
                offset, ack = held.popleft()
                done.discard(offset)
                if ack is None:
                    batch.append(offset)
                else:
                    if batch and acker is not None:  # keep offset order across both paths
                        acker(partition, batch)
                        batch = []
                    ack()
            if batch and acker is not None:
                acker(partition, batch)
        self._update_gauge()

    def _update_gauge(self) -> None:
        metrics.IN_FLIGHT.set(sum(len(p.open) for p in self.parts.values()))
