"""Per-partition usage state: the fold over one finished-response partition, in offset
order, bounded by what is open.

What the state holds, and its bound:

* ``buckets``: the **open** buckets only, in 1-minute and 1-hour windows. A window is
  open while ``window_end + late_grace >= stream_time`` (stream time = the latest
  plausible event time seen on the partition). :meth:`drain` publishes a closed window's
  final total once and evicts it. Bound: distinct dimension combinations x the windows
  within the grace (about ``grace / 1 min + 2`` minute windows and 2 hour windows).
* **Late data** (a completion whose window had already closed, or whose event time is
  implausible): its contribution is published as its own increment record, keyed by its
  source offset, and kept only until the next :meth:`drain`. Exact (the key is a
  function of the completion's offset, so a replay re-publishes the same record) and
  bounded (one interval's late completions).
* **Dedup horizon**: the ids of the responses seen in the last ``dedup_ms`` of record
  timestamps. Two kinds of "seen again" exist, and they are handled differently:

  1. *Redelivery of the same offset* (a replay after a crash, faust redelivering after a
     rebalance): ``next_offset`` drops every offset already folded. This needs no memory
     of ids at all and holds for any age, because the state always reflects exactly the
     offsets below ``next_offset`` (it is restored from a checkpoint together with it).
  2. *A re-emission at a new offset*: the stitcher emits a completion again, as an
     identical record, only when it died between "response acknowledged" and "ledger
     acknowledged"; the copy comes when the restarted worker replays that stream, i.e.
     after its downtime plus the replay. Event time cannot bound that (the copy has the
     same event time as the original, and its window may have closed meanwhile), but
     the records' own timestamps (when each copy was written) can: the copy is written
     at most ``dedup_ms`` after the original for any outage shorter than that. Beyond it
     the copy would be counted twice; that is the documented bound
     (``CHUNKSTITCH_USAGE_DEDUP_S``, default 10 min).

  Bound: the responses written in the last ``dedup_ms``. The ids are not written into
  the checkpoint (they could outgrow a record); the checkpoint names
  ``dedup_from_offset`` and recovery re-reads ``[dedup_from_offset, next_offset)`` for
  their ids only. Replaying :meth:`remember` over that range rebuilds exactly the same
  horizon (see :meth:`restore`).

* **Cardinality cap** of the user and attribute dimensions: admission is scoped per
  (this partition, hour window, dimension). A value is admitted into hour ``H`` if an
  open on-time bucket of ``H`` already has it, or if fewer than ``cap`` distinct values
  are there; otherwise the completion counts as ``other`` in that dimension (counted in
  ``capped``). The minute buckets use the decision of their hour, so the minute and hour
  rollups agree. The admitted values are a function of the open hour buckets alone
  (``_admitted`` is an index of them, rebuilt from the checkpoint's buckets), so a state
  restored from a checkpoint decides every later completion exactly as the original
  did: same buckets, totals stay exact. No state beyond the open buckets; a completion
  whose hour has already closed (a late increment, its own record) keeps its values.
  Bound: at most ``cap`` distinct real values (+ ``other``, ``unknown``) per dimension,
  partition and open hour.

Everything here is deterministic in offset order: the same records from the same
checkpoint give the same state and the same published records, which is what makes
re-publishing after a crash harmless.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pydantic import ValidationError

from processor.core import combine, contribution, result, zero
from processor.core._usage import MINUTE_MS, event_time_ms, labels
from topics import ChatCompletion, UsageCheckpoint, UsageKey, UsageRollup, UsageTotals
from topics._usage import OTHER, UNKNOWN

__all__ = ["HOUR_MS", "RESOLUTIONS", "Drained", "PartitionUsage"]

HOUR_MS = 60 * MINUTE_MS
RESOLUTIONS = (MINUTE_MS, HOUR_MS)
"""Windows kept and published by the worker (1 day is summed from 1 hour on read)."""

EARLIEST_PLAUSIBLE_MS = 946_684_800_000
"""2000-01-01: an event time before it is not a real request time."""

_FIELDS = tuple(UsageTotals.model_fields)


def _pack(totals: UsageTotals) -> tuple[int | tuple[int, ...], ...]:
    return tuple(getattr(totals, name) for name in _FIELDS)


def _unpack(values: tuple[int | tuple[int, ...], ...]) -> UsageTotals:
    return UsageTotals(**dict(zip(_FIELDS, values, strict=True)))


@dataclass
class Drained:
    """What one :meth:`PartitionUsage.drain` hands to the publisher, in this order:
    the rollups (finals, changed open buckets, late increments), then the checkpoint
    that reflects them (written only after every rollup is acknowledged)."""

    rollups: list[UsageRollup]
    checkpoint: UsageCheckpoint | None
    closed: int = 0


@dataclass
class PartitionUsage:
    """The usage fold of one responses partition."""

    partition: int
    late_grace_ms: int
    dedup_ms: int = 600_000
    max_future_ms: int = 3_600_000
    topic: str = ""
    max_users: int = 1000
    attribute_caps: dict[str, int] = field(default_factory=dict)
    """Cap per attribute name; a name not listed (an older allowlist): max_attribute_values."""
    max_attribute_values: int = 1000
    buckets: dict[UsageKey, UsageTotals] = field(default_factory=dict)
    changed: set[UsageKey] = field(default_factory=set)
    late_out: list[UsageRollup] = field(default_factory=list)
    stream_time_ms: int = 0
    """The latest plausible event time seen on this partition: lateness is judged against it."""
    next_offset: int = 0
    counted: int = 0
    invalid: int = 0
    late: int = 0
    implausible: int = 0
    last_late: str | None = None
    """How the last counted completion was late: None, 'late' or 'implausible'."""
    capped: dict[str, int] = field(default_factory=dict)
    """Completions counted as ``other``, per dimension (``user``, ``attr.<name>``)."""
    last_capped: list[str] = field(default_factory=list)
    """The dimensions the last counted completion was capped in."""
    cap_reached: list[tuple[int, str]] = field(default_factory=list)
    """(hour, dimension) that reached its cap since the caller last cleared it (logging)."""
    _admitted: dict[int, dict[str, set[str]]] = field(default_factory=dict)
    """hour window start -> dimension -> the values its open on-time hour buckets hold."""
    _full: set[tuple[int, str]] = field(default_factory=set)
    _horizon: deque[tuple[int, int, str]] = field(default_factory=deque)
    _seen: dict[str, int] = field(default_factory=dict)
    _latest_ts: int = 0
    _checkpointed_offset: int = -1

    # --- folding ---------------------------------------------------------------------------

    def remember(self, offset: int, key: bytes | None, timestamp_ms: int | None) -> bool:
        """Put a response id into the dedup horizon; False if it was already there."""
        if key is None:
            return True
        cid = key.decode("utf-8", "replace")
        ts = timestamp_ms if timestamp_ms is not None and timestamp_ms >= 0 else self._latest_ts
        fresh = cid not in self._seen
        self._horizon.append((ts, offset, cid))
        self._seen[cid] = offset
        if ts > self._latest_ts:
            self._latest_ts = ts
        floor = self._latest_ts - self.dedup_ms
        horizon = self._horizon
        while horizon and horizon[0][0] < floor:
            _, old_offset, old = horizon.popleft()
            if self._seen.get(old) == old_offset:
                del self._seen[old]
        return fresh

    def apply(
        self,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
    ) -> ChatCompletion | None:
        """Fold one record (in offset order); the response if it was counted now."""
        if offset < self.next_offset:
            return None  # already folded (restored from a checkpoint, then redelivered)
        self.next_offset = offset + 1
        if value is None or key is None:
            return None  # a tombstone: nothing to count
        if not self.remember(offset, key, timestamp_ms):
            return None  # the same completion again (an identical re-emission)
        try:
            response = ChatCompletion.model_validate_json(value)
        except ValidationError:
            self.invalid += 1
            return None
        self.counted += 1
        event = event_time_ms(response)
        reference = timestamp_ms if timestamp_ms is not None and timestamp_ms > 0 else event
        plausible = EARLIEST_PLAUSIBLE_MS <= event <= reference + self.max_future_ms
        if not plausible:
            self.implausible += 1
        any_late = False
        dims = labels(response)
        if self.last_capped:
            self.last_capped = []
        hour = event // HOUR_MS * HOUR_MS
        if (dims[0] != UNKNOWN or dims[1]) and (
            plausible and hour + HOUR_MS + self.late_grace_ms >= self.stream_time_ms
        ):
            dims = self._admit(hour, dims)
        for size in RESOLUTIONS:
            window_end = event // size * size + size
            late = not plausible or window_end + self.late_grace_ms < self.stream_time_ms
            bucket, totals = contribution(response, window_ms=size, late=late, dims=dims)
            if late:
                any_late = True
                rollup = result(bucket, totals, self.partition)
                self.late_out.append(rollup.model_copy(update={"source_offset": offset}))
            else:
                self.buckets[bucket] = combine(self.buckets.get(bucket, zero()), totals)
                self.changed.add(bucket)
        self.last_late = None if not any_late else "late" if plausible else "implausible"
        if any_late:
            self.late += 1
        if plausible and event > self.stream_time_ms:
            self.stream_time_ms = event
        return response

    def _admit(
        self, hour: int, dims: tuple[str, tuple[tuple[str, str], ...]]
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The user and attributes a completion of the open hour ``hour`` is counted under
        (see the module docstring: a function of that hour's open buckets)."""
        index = self._admitted.setdefault(hour, {})
        user, attrs = dims
        user = self._admit_one(index, hour, "user", user, self.max_users)
        if attrs:
            caps = self.attribute_caps
            attrs = tuple(
                (
                    name,
                    self._admit_one(
                        index,
                        hour,
                        "attr." + name,
                        value,
                        caps.get(name, self.max_attribute_values),
                    ),
                )
                for name, value in attrs
            )
        return user, attrs

    def _admit_one(
        self, index: dict[str, set[str]], hour: int, dim: str, value: str, cap: int
    ) -> str:
        if value in (UNKNOWN, OTHER):
            return value
        seen = index.get(dim)
        if seen is None:
            seen = index[dim] = set()
        elif value in seen:
            return value
        if len(seen) < cap:
            seen.add(value)
            return value
        self.capped[dim] = self.capped.get(dim, 0) + 1
        self.last_capped.append(dim)
        if (hour, dim) not in self._full:
            self._full.add((hour, dim))
            self.cap_reached.append((hour, dim))
        return OTHER

    def _index(self, key: UsageKey) -> None:
        """Add an open on-time hour bucket's values to the admission index."""
        index = self._admitted.setdefault(key.window_start_ms, {})
        values = [("user", key.user), *(("attr." + n, v) for n, v in key.attributes)]
        for dim, value in values:
            if value not in (UNKNOWN, OTHER):
                index.setdefault(dim, set()).add(value)

    # --- publishing ------------------------------------------------------------------------

    def drain(self) -> Drained:
        """Close the windows past the grace (final records, evicted), take the changed open
        buckets and the late increments, and snapshot the checkpoint that reflects them."""
        out: list[UsageRollup] = []
        horizon = self.stream_time_ms - self.late_grace_ms
        closed = [k for k in self.buckets if k.window_start_ms + k.window_ms < horizon]
        for hour in [h for h in self._admitted if h + HOUR_MS < horizon]:
            del self._admitted[hour]  # its hour buckets close in this drain
            self._full = {f for f in self._full if f[0] != hour}
        for key in closed:
            totals = self.buckets.pop(key)
            self.changed.discard(key)
            out.append(result(key, totals, self.partition).model_copy(update={"final": True}))
        for key in self.changed:
            out.append(result(key, self.buckets[key], self.partition))
        self.changed.clear()
        out.extend(self.late_out)
        self.late_out.clear()
        out = [r.model_copy(update={"as_of_offset": self.next_offset}) for r in out]
        checkpoint = None
        if self.next_offset != self._checkpointed_offset or out:
            checkpoint = self.checkpoint()
            self._checkpointed_offset = self.next_offset
        return Drained(out, checkpoint, len(closed))

    def checkpoint(self) -> UsageCheckpoint:
        """The state as a record (without the dedup ids: see the module docstring)."""
        return UsageCheckpoint(
            source_topic=self.topic,
            source_partition=self.partition,
            next_offset=self.next_offset,
            stream_time_ms=self.stream_time_ms,
            dedup_from_offset=self._horizon[0][1] if self._horizon else self.next_offset,
            dedup_latest_ts_ms=self._latest_ts,
            buckets=[(k, _pack(t)) for k, t in self.buckets.items()],
            counted=self.counted,
            invalid=self.invalid,
            late=self.late,
            capped=dict(self.capped),
        )

    @classmethod
    def restore(
        cls,
        checkpoint: UsageCheckpoint,
        *,
        late_grace_ms: int,
        dedup_ms: int,
        max_future_ms: int,
        max_users: int = 1000,
        attribute_caps: dict[str, int] | None = None,
        max_attribute_values: int = 1000,
    ) -> PartitionUsage:
        """The state a checkpoint describes. Its dedup horizon is still empty: feed the
        responses in ``[dedup_from_offset, next_offset)`` to :meth:`remember`, in offset
        order, then call :meth:`restored`.

        Why that rebuilds the same horizon: at checkpoint time the horizon held exactly
        the keyed records from ``dedup_from_offset`` on (eviction only ever pops the
        front). Replaying them, the running maximum timestamp is never above the one the
        original run had at the same record, so the replay evicts nothing that the
        original kept; afterwards the latest timestamp is set back to the checkpoint's."""
        state = cls(
            checkpoint.source_partition,
            late_grace_ms,
            dedup_ms,
            max_future_ms,
            checkpoint.source_topic,
            max_users=max_users,
            attribute_caps=dict(attribute_caps or {}),
            max_attribute_values=max_attribute_values,
            stream_time_ms=checkpoint.stream_time_ms,
            next_offset=checkpoint.next_offset,
            counted=checkpoint.counted,
            invalid=checkpoint.invalid,
            late=checkpoint.late,
            capped=dict(checkpoint.capped),
        )
        state.buckets = {k: _unpack(v) for k, v in checkpoint.buckets}
        for key in state.buckets:
            if key.window_ms == HOUR_MS and not key.late:
                state._index(key)
        state._checkpointed_offset = checkpoint.next_offset
        state._latest_ts = 0
        return state

    def restored(self, checkpoint: UsageCheckpoint) -> None:
        """End of the dedup re-read (see :meth:`restore`)."""
        self._latest_ts = max(self._latest_ts, checkpoint.dedup_latest_ts_ms)

    @property
    def horizon_size(self) -> int:
        return len(self._horizon)
