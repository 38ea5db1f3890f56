"""The usage plug-in of the worker: an agent on the responses topic, a publisher timer
(rollups, then checkpoints), token metrics, and the supervised read model with its
``GET /usage`` server (``_serve.py``: its own port and event loop, never the worker's).

Per responses partition (``PartitionUsage``, see ``_state.py`` for the bounds):

* **Recovery** after an assignment: the latest checkpoint of the partition (the newest
  valid record of its checkpoint-topic partition; one record is read, not the history),
  then one read of the responses partition from the checkpoint's ``dedup_from_offset``:
  records below ``next_offset`` only refill the dedup horizon, the ones from
  ``next_offset`` to the end are folded, and published (rollups, then a checkpoint)
  every ``rollup_interval_s`` meanwhile, as the live fold is: a long backlog holds only
  the windows still open, not every window it spans. Then live records continue; any offset below
  ``next_offset`` (faust's committed offset may be behind or ahead of the checkpoint: a
  crash between a checkpoint and an offset commit) is dropped by the state itself. The
  committed offset is therefore never trusted for correctness, only as a starting point.
* **Publishing** every ``rollup_interval_s``: :meth:`PartitionUsage.drain` closes the
  windows past the grace (final totals, evicted), takes the changed open buckets and the
  late increments, and snapshots the checkpoint. The rollups are sent and acknowledged
  first, then the checkpoint: a checkpoint never describes a state whose rollups are not
  durable. A crash in between makes recovery start from the older checkpoint and re-send
  the same records (absolute totals under the same keys, late increments keyed by their
  offset): harmless.
* **Revocation** writes a last checkpoint of the revoked partitions before dropping them,
  so their new owner starts exactly where this worker stopped (and the token counter of
  each completion is incremented by exactly one live process).
* **Metrics**: a completion is counted (tokens, completions by status, latency histograms
  by status) when it is folded into the state for the first time, which includes the
  catch-up after a restart: what the previous process folded after its last checkpoint
  died with that process's counters. A Prometheus counter restarts at 0 with its
  process; ``increase()`` across the restart then covers every completion once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import faust
from pydantic import ValidationError

from processor import metrics
from processor.core._usage import MINUTE_MS
from processor.kafka import end_offsets, read_to_end
from processor.logs import get_logger
from processor.settings import Settings
from processor.usage._serve import start_service
from processor.usage._state import PartitionUsage
from processor.worker._supervise import supervisor
from topics import ChatCompletion, UsageCheckpoint

__all__ = ["lease_renewed", "load_checkpoint", "may_publish", "register"]

log = get_logger("chunkstitch.usage")


async def load_checkpoint(settings: Settings, partition: int) -> UsageCheckpoint | None:
    """The newest valid checkpoint of a responses partition (None: there is none yet).

    Reads back from the end: the last record first (on Kafka compaction keeps one per
    key anyway; the embedded broker never compacts, so reading the partition from its
    beginning would grow with history), further back only if that one is unusable."""
    from aiokafka import TopicPartition

    tp = TopicPartition(settings.usage_checkpoints_topic, partition)
    end = (await end_offsets(settings, [tp])).get(tp, 0)
    if end <= 0:  # nothing was ever written there (on either broker: see end_offsets)
        return None
    back = 1
    while True:
        start = max(end - back, 0)
        found: UsageCheckpoint | None = None
        for rec in await read_to_end(
            settings, [tp], start={tp: start}, timeout_s=settings.usage_read_stall_s
        ):
            if rec.value is None or rec.key != str(partition).encode():
                continue
            try:
                cp = UsageCheckpoint.model_validate_json(rec.value)
            except ValidationError:
                log.warning(
                    "usage checkpoint does not validate; looking further back",
                    partition=partition,
                    offset=rec.offset,
                )
                continue
            if cp.source_topic == settings.topic_responses and cp.source_partition == partition:
                found = cp
        if found is not None or start == 0:
            return found
        back *= 16


def register(app: faust.App, settings: Settings) -> None:
    """Add the usage agent, its publisher timer, and the read model with ``/usage``."""
    sup = supervisor(app)
    responses = app.topic(
        settings.topic_responses,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )
    grace_ms = int(settings.rollup_late_grace_s * 1000)
    dedup_ms = int(settings.usage_dedup_s * 1000)
    future_ms = int(settings.usage_max_future_s * 1000)
    max_users = settings.usage_max_users
    attribute_caps = settings.usage_attribute_caps
    max_values = settings.usage_max_attribute_values
    dimension_values: dict[str, set[str]] = {}
    parts: dict[int, PartitionUsage] = {}
    loading: dict[int, asyncio.Task[PartitionUsage]] = {}
    assigned: set[int] = set()
    publish_lock = asyncio.Lock()
    labels_seen: set[tuple[str, str, str]] = set()
    service = start_service(settings)

    def count(response: ChatCompletion) -> None:
        _observe(response, settings.metrics_label_cap, labels_seen)
        _observe_dimensions(response, settings, dimension_values)

    async def recover(partition: int) -> PartitionUsage:
        from aiokafka import TopicPartition

        began = time.monotonic()
        cp = await load_checkpoint(settings, partition)
        tp = TopicPartition(settings.topic_responses, partition)
        if cp is None:
            state = PartitionUsage(
                partition,
                grace_ms,
                dedup_ms,
                future_ms,
                tp.topic,
                max_users,
                attribute_caps,
                max_values,
            )
            start = None
        else:
            state = PartitionUsage.restore(
                cp,
                late_grace_ms=grace_ms,
                dedup_ms=dedup_ms,
                max_future_ms=future_ms,
                max_users=max_users,
                attribute_caps=attribute_caps,
                max_attribute_values=max_values,
            )
            start = {tp: min(cp.dedup_from_offset, cp.next_offset)}
        folded = [0, 0]  # re-read for ids, folded
        restored = [cp is None]
        drained_at = [time.monotonic()]

        async def fold(records: list[Any]) -> None:
            for i, rec in enumerate(records):
                # Publish while catching up, as the live fold does every interval: a
                # backlog spanning many windows would otherwise hold every one of them
                # (closed or not) until the read ends, beyond the state's bound (the open
                # windows). Checked within a batch too: one fetch may be megabytes. Only
                # once the dedup re-read is over: the state is then the one a live worker
                # would have had at this offset, so its checkpoint is as good.
                if (
                    restored[0]
                    and not i % 256
                    and time.monotonic() - drained_at[0] >= settings.rollup_interval_s
                ):
                    await flush([state])
                    drained_at[0] = time.monotonic()
                if cp is not None and rec.offset < cp.next_offset:
                    if rec.value is not None:
                        state.remember(rec.offset, rec.key, rec.timestamp)
                    folded[0] += 1
                    continue
                if not restored[0] and cp is not None:
                    state.restored(cp)
                    restored[0] = True
                response = state.apply(rec.offset, rec.key, rec.value, rec.timestamp)
                folded[1] += 1
                if response is not None:
                    count(response)
                    _late_note(state, response, rec.offset, settings)

        def progress(p: Any) -> None:
            log.info(
                "usage recovery in progress",
                partition=partition,
                records=p.records,
                behind=p.behind,
                elapsed_s=round(p.elapsed_s, 1),
            )

        await read_to_end(
            settings,
            [tp],
            timeout_s=settings.usage_read_stall_s,
            start=start,
            on_records=fold,
            on_progress=progress,
        )
        if not restored[0] and cp is not None:
            state.restored(cp)
        seconds = time.monotonic() - began
        metrics.USAGE_RECOVERY.observe(seconds)
        log.info(
            "usage state restored",
            partition=partition,
            checkpoint_offset=cp.next_offset if cp else None,
            dedup_reread=folded[0],
            folded=folded[1],
            next_offset=state.next_offset,
            open_buckets=len(state.buckets),
            seconds=round(seconds, 3),
        )
        return state

    def start_recovery(partition: int) -> asyncio.Task[PartitionUsage]:
        task = loading.get(partition)
        if task is None:
            task = loading[partition] = asyncio.ensure_future(recover(partition))
        return task

    async def partition_state(partition: int) -> PartitionUsage | None:
        state = parts.get(partition)
        if state is not None:
            return state
        if partition not in assigned:
            return None  # revoked meanwhile: its new owner counts it
        task = start_recovery(partition)
        try:
            state = await task
        finally:
            if loading.get(partition) is task and task.done():
                loading.pop(partition, None)
        if partition not in assigned:
            return None
        parts[partition] = state
        return state

    @app.agent(responses, concurrency=1)
    @sup.guard("usage agent")
    async def count_usage(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(Any, stream).take_events(500, 0.05):
            for event in events:
                message = event.message
                state = await partition_state(message.partition)
                if state is None:
                    continue
                ts = message.timestamp
                response = state.apply(
                    message.offset,
                    message.key,
                    message.value,
                    int(ts * 1000) if ts else None,
                )
                if response is not None:
                    count(response)
                    _late_note(state, response, message.offset, settings)

    lease = getattr(app, "lease", None)

    async def flush(states: list[PartitionUsage], *, revoking: bool = False) -> None:
        """Rollups first (acknowledged), then the checkpoints that reflect them. Only
        under the membership lease (as the stitcher's outputs): a worker that may have
        lost its partitions writes no rollup and no older checkpoint; its state stays
        undrained and goes out at the next interval once the lease is renewed."""
        async with publish_lock:
            if not may_publish(lease, revoking=revoking):
                if revoking:
                    log.warning(
                        "not checkpointing the revoked usage partitions: the membership "
                        "lease had lapsed (this worker may no longer own them); their new "
                        "owner refolds from the previous checkpoint",
                        partitions=[s.partition for s in states],
                    )
                return
            drained = [(s, s.drain()) for s in states]
            acks = []
            for state, d in drained:
                target = state.partition % settings.partitions
                for rollup in d.rollups:
                    topic = (
                        settings.topic_rollups
                        if rollup.key.window_ms == MINUTE_MS
                        else settings.rollups_hourly_topic
                    )
                    acks.append(
                        await app.producer.send(
                            topic,
                            rollup.key.record_key(
                                rollup.source_partition, rollup.source_offset
                            ).encode(),
                            rollup.model_dump_json().encode(),
                            target,
                            None,
                            None,
                        )
                    )
            await _acknowledged(acks, settings, "usage rollups")
            acks = []
            for state, d in drained:
                if d.checkpoint is None:
                    continue
                acks.append(
                    await app.producer.send(
                        settings.usage_checkpoints_topic,
                        str(state.partition).encode(),
                        d.checkpoint.model_dump_json().encode(),
                        state.partition,
                        None,
                        None,
                    )
                )
            await _acknowledged(acks, settings, "usage checkpoints")
            metrics.USAGE_CHECKPOINTS.inc(len(acks))

    @app.timer(settings.rollup_interval_s)  # type: ignore[untyped-decorator,unused-ignore]
    @sup.guard("usage publisher")
    async def publish_rollups() -> None:
        # A lapse between two heartbeats is short; this timer and the heartbeats run at
        # similar periods, so skipping the turn could skip every turn for a long while.
        await lease_renewed(lease, within_s=settings.rollup_interval_s)
        await flush(list(parts.values()))
        metrics.USAGE_OPEN_BUCKETS.set(sum(len(s.buckets) for s in parts.values()))
        metrics.USAGE_DEDUP_IDS.set(sum(s.horizon_size for s in parts.values()))

    @app.on_partitions_assigned.connect  # type: ignore[arg-type,unused-ignore]
    async def on_assigned(sender: Any, assigned_tps: set[Any], **kwargs: Any) -> None:
        for tp in assigned_tps:
            if tp.topic == settings.topic_responses:
                assigned.add(tp.partition)
                if tp.partition not in parts:
                    start_recovery(tp.partition)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type,unused-ignore]
    async def on_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        gone = [tp.partition for tp in revoked if tp.topic == settings.topic_responses]
        states = []
        for partition in gone:
            assigned.discard(partition)
            task = loading.pop(partition, None)
            if task is not None:
                task.cancel()
            state = parts.pop(partition, None)
            if state is not None:
                states.append(state)
        if not states:
            return
        try:
            await asyncio.wait_for(flush(states, revoking=True), timeout=settings.session_timeout_s)
        except Exception as exc:
            log.warning(
                "could not checkpoint the revoked usage partitions; their new owner "
                "refolds from the previous checkpoint (exact totals; the token metrics "
                "may count those completions in both workers)",
                partitions=gone,
                error=f"{type(exc).__name__}: {exc}",
            )

    @app.task  # type: ignore[untyped-decorator,unused-ignore]
    @sup.guard("usage server")  # cannot listen, or ended: the worker stops, loudly
    async def run_usage_server() -> None:
        service.start()
        try:
            await service.wait_failed()
        finally:
            service.stop()


async def lease_renewed(lease: Any, *, within_s: float, poll_s: float = 0.01) -> bool:
    """Whether ``lease`` is valid now or becomes valid within ``within_s`` (it is renewed
    from faust's consumer thread, another event loop: polled)."""
    if lease is None or lease.valid():
        return True
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        if lease.valid():
            return True
    return False


def may_publish(lease: Any, *, revoking: bool = False) -> bool:
    """Whether the usage publisher may write now: no lease (a bare app) or a valid one;
    for the last checkpoint of revoked partitions, a lease that was valid when the
    revocation came (the rebalance itself revokes it just before)."""
    if lease is None or lease.valid():
        return True
    return revoking and bool(lease.held_at_revoke)


async def _acknowledged(acks: list[Any], settings: Settings, what: str) -> None:
    if not acks:
        return
    try:
        await asyncio.wait_for(asyncio.gather(*acks), timeout=settings.usage_publish_timeout_s)
    except TimeoutError:
        raise TimeoutError(
            f"{what} were not acknowledged within {settings.usage_publish_timeout_s:.0f}s "
            f"(CHUNKSTITCH_USAGE_PUBLISH_TIMEOUT_S); is the broker at {settings.broker} up?"
        ) from None


def _late_note(
    state: PartitionUsage, response: ChatCompletion, offset: int, settings: Settings
) -> None:
    for dim in state.last_capped:
        metrics.USAGE_CAPPED.labels(dim, "rollups").inc()
    if state.cap_reached:
        for hour, dim in state.cap_reached:
            log.warning(
                "usage dimension reached its cap in this hour; further values are counted "
                "as 'other' (raise CHUNKSTITCH_USAGE_MAX_USERS / _MAX_ATTRIBUTE_VALUES or "
                "the name:cap in CHUNKSTITCH_USAGE_ATTRIBUTES if they are expected)",
                partition=state.partition,
                dimension=dim,
                hour_start_ms=hour,
                folded_so_far=state.capped.get(dim, 0),
            )
        state.cap_reached.clear()
    outcome = state.last_late
    if outcome is None:
        return
    metrics.USAGE_LATE.labels(outcome).inc()
    log.warning(
        "late completion published as a late increment",
        completion_id=response.id,
        partition=state.partition,
        offset=offset,
        grace_s=settings.rollup_late_grace_s,
        reason=outcome,
    )


def _observe_dimensions(
    response: ChatCompletion, settings: Settings, seen: dict[str, set[str]]
) -> None:
    """Tokens by user and by each attribute, at most the dimension's cap of distinct
    values per process (the series of a process only ever grow), 'other' beyond."""
    usage = response.usage
    meta = response.chunkstitch
    if usage is None or not (meta.user or meta.attributes):
        return
    pairs = [("user", meta.user)] if meta.user else []
    caps = settings.usage_attribute_caps
    pairs += [("attr." + k, v) for k, v in sorted((meta.attributes or {}).items())]
    for dim, value in pairs:
        cap = (
            settings.usage_max_users
            if dim == "user"
            else caps.get(dim[5:], settings.usage_max_attribute_values)
        )
        values = seen.setdefault(dim, set())
        if value not in values:
            if len(values) >= cap:
                metrics.USAGE_CAPPED.labels(dim, "metrics").inc()
                value = "other"
            else:
                values.add(value)
        metrics.USAGE_DIMENSION_TOKENS.labels(dim, value, "prompt").inc(usage.prompt_tokens)
        metrics.USAGE_DIMENSION_TOKENS.labels(dim, value, "completion").inc(usage.completion_tokens)


def _observe(response: ChatCompletion, cap: int, seen: set[tuple[str, str, str]]) -> None:
    meta = response.chunkstitch
    metrics.USAGE_COMPLETIONS.labels(meta.status).inc()
    if meta.time_to_first_chunk_ms is not None:
        metrics.TTFC.labels(meta.status).observe(meta.time_to_first_chunk_ms / 1000)
    if meta.duration_ms is not None:
        metrics.DURATION.labels(meta.status).observe(meta.duration_ms / 1000)
    usage = response.usage
    if usage is None:
        return
    labels = (
        meta.tenant or "unknown",
        response.model or "unknown",
        meta.provider or "unknown",
    )
    if labels not in seen:
        if len(seen) >= cap:
            labels = ("other", "other", "other")
        else:
            seen.add(labels)
    metrics.TOKENS.labels(*labels, "prompt").inc(usage.prompt_tokens)
    metrics.TOKENS.labels(*labels, "completion").inc(usage.completion_tokens)
    if response.chunkstitch.cost_reported is not None:
        metrics.COST.labels(*labels, "reported").inc(response.chunkstitch.cost_reported)
    if response.chunkstitch.cost_estimated is not None:
        metrics.COST.labels(*labels, "estimated").inc(response.chunkstitch.cost_estimated)
