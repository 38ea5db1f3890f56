"""Bounded usage state: open windows only, late increments, the dedup horizon, and
checkpoint + restore equal to an uninterrupted fold (property-tested)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core import assemble_many, parse_chunk
from processor.synthetic import make_stream
from processor.usage import PartitionUsage, UsageView
from processor.usage._state import HOUR_MS
from topics import ChatCompletion, UsageCheckpoint, UsageRollup

T0 = 1_760_000_000_000 // HOUR_MS * HOUR_MS
GRACE = 300_000
DEDUP = 600_000

_BASE = assemble_many(
    parse_chunk(c) for c in make_stream("openai-text", "x", random.Random(5)).chunks
)[0]


def response(
    cid: str,
    started_ms: int,
    tenant: str = "acme",
    user: str | None = None,
    attributes: dict[str, str] | None = None,
) -> bytes:
    meta = _BASE.chunkstitch.model_copy(
        update={
            "tenant": tenant,
            "request_started_at_ms": started_ms,
            "user": user,
            "attributes": attributes,
        }
    )
    return _BASE.model_copy(update={"id": cid, "chunkstitch": meta}).to_json()


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None
    ts: int


CAPS = {"max_users": 2, "attribute_caps": {"feature": 2}, "max_attribute_values": 1}


def fresh() -> PartitionUsage:
    return PartitionUsage(0, GRACE, DEDUP, 3_600_000, "responses", **CAPS)  # type: ignore[arg-type]


def totals_of(
    rollups: list[UsageRollup], window_ms: int = 60_000, dims: bool = False
) -> dict[tuple[object, ...], int]:
    """What a reader sees: the latest record per key, summed per (window, late), with
    ``dims`` per (window, late, user, attributes) too (the cap's decisions)."""
    latest = {}
    for r in rollups:
        if r.key.window_ms == window_ms:
            latest[r.key.record_key(r.source_partition, r.source_offset)] = r
    out: Counter[tuple[object, ...]] = Counter()
    for r in latest.values():
        k = r.key
        group = (
            (k.window_start_ms, k.late, k.user, k.attributes)
            if dims
            else (k.window_start_ms, k.late)
        )
        out[group] += r.totals.requests
    return dict(out)


def test_closed_windows_are_published_final_and_evicted() -> None:
    state = fresh()
    published: list[UsageRollup] = []
    for i in range(600):  # ten hours of traffic, one completion a minute
        t = T0 + i * 60_000
        state.apply(i, f"c{i}".encode(), response(f"c{i}", t), t)
        if i % 10 == 0:
            published += state.drain().rollups
    published += state.drain().rollups
    minute_windows = {k.window_start_ms for k in state.buckets if k.window_ms == 60_000}
    assert len(minute_windows) <= GRACE // 60_000 + 2  # only the windows within the grace
    assert len([k for k in state.buckets if k.window_ms == HOUR_MS]) <= 2
    finals = [r for r in published if r.final and r.key.window_ms == 60_000]
    assert len(finals) == 600 - len(minute_windows)
    assert sum(totals_of(published).values()) == 600
    assert sum(totals_of(published, HOUR_MS).values()) == 600
    # the dedup horizon holds the last DEDUP ms of record timestamps, not the history
    assert state.horizon_size <= DEDUP // 60_000 + 1


def test_late_completions_are_increments_keyed_by_their_offset() -> None:
    state = fresh()
    state.apply(0, b"now", response("now", T0 + 3_600_000), T0 + 3_600_000)
    state.apply(1, b"old", response("old", T0), T0 + 3_600_000)
    state.apply(2, b"old2", response("old2", T0 + 5), T0 + 3_600_000)
    drained = state.drain().rollups
    late = [r for r in drained if r.key.late and r.key.window_ms == 60_000]
    assert sorted(r.source_offset for r in late if r.source_offset is not None) == [1, 2]
    keys = {r.key.record_key(r.source_partition, r.source_offset) for r in late}
    assert len(keys) == 2
    assert all(k.endswith(("|0|1", "|0|2")) for k in keys)
    assert state.late_out == []
    assert state.late == 2


def test_implausible_event_times_never_move_stream_time() -> None:
    state = fresh()
    state.apply(0, b"a", response("a", T0), T0)
    absurd = 1_000_000_000_000_000_000_000_000_000_000
    state.apply(1, b"b", response("b", absurd), T0)
    state.apply(2, b"c", response("c", 5), T0)  # 1970
    assert state.stream_time_ms == T0
    assert state.implausible == 2
    state.apply(3, b"d", response("d", T0 + 1000), T0)
    rollups = state.drain().rollups
    assert totals_of(rollups)[(T0, False)] == 2  # later completions are not skewed late
    assert {r.key.window_start_ms for r in rollups if r.key.late} == {
        absurd // 60_000 * 60_000,
        absurd // HOUR_MS * HOUR_MS,
        0,
    }


def test_identical_re_emission_within_the_horizon_is_not_counted_twice() -> None:
    state = fresh()
    assert state.apply(0, b"a", response("a", T0), T0) is not None
    assert state.apply(1, b"a", response("a", T0), T0 + DEDUP - 1) is None
    state.apply(2, b"b", response("b", T0), T0 + 2 * DEDUP)
    # beyond the horizon the id is forgotten (the documented bound)
    assert state.apply(3, b"a", response("a", T0), T0 + 2 * DEDUP) is not None


def _stream(rnd: random.Random, n: int) -> list[Rec]:
    recs: list[Rec] = []
    ts = T0
    event = T0
    for i in range(n):
        ts += rnd.choice((1_000, 30_000, 120_000))
        event += rnd.choice((-400_000, 0, 20_000, 60_000, 200_000))
        kind = rnd.random()
        if kind < 0.1 and recs:
            prev = rnd.choice(recs)
            recs.append(Rec(i, prev.key, prev.value, ts))  # an identical re-emission
        elif kind < 0.15:
            recs.append(Rec(i, f"t{i}".encode(), None, ts))  # a tombstone
        elif kind < 0.18:
            recs.append(Rec(i, f"bad{i}".encode(), b"{not json", ts))
        else:
            tenant = rnd.choice(("a", "b"))
            user = rnd.choice((None, "u1", "u2", "u3", "u4", "u5"))
            attrs = rnd.choice((None, {"feature": "f1"}, {"feature": "f2", "env": "e1"}))
            if rnd.random() < 0.3:
                attrs = {"feature": f"f{rnd.randint(3, 6)}", "env": f"e{rnd.randint(2, 3)}"}
            value = response(f"c{i}", event, tenant, user, attrs)
            recs.append(Rec(i, f"c{i}".encode(), value, ts))
    return recs


def _run(
    recs: list[Rec], crashes: list[int], redeliver: int
) -> tuple[list[UsageRollup], PartitionUsage]:
    """Fold with a drain every 5 records; at each crash point, throw the state away,
    restore from the last written checkpoint, re-read the dedup range and refold from
    its offset (redelivering `redeliver` records before it, as a lagging commit would)."""
    published: list[UsageRollup] = []
    checkpoint: UsageCheckpoint | None = None
    state = fresh()
    i = 0
    crash_at = sorted(set(crashes))
    while i < len(recs):
        if crash_at and i == crash_at[0]:
            crash_at.pop(0)
            if checkpoint is None:
                state, i = fresh(), 0
            else:
                state = PartitionUsage.restore(
                    checkpoint,
                    late_grace_ms=GRACE,
                    dedup_ms=DEDUP,
                    max_future_ms=3_600_000,
                    **CAPS,  # type: ignore[arg-type]
                )
                for r in recs[checkpoint.dedup_from_offset : checkpoint.next_offset]:
                    if r.value is not None:
                        state.remember(r.offset, r.key, r.ts)
                state.restored(checkpoint)
                i = max(checkpoint.next_offset - redeliver, 0)
            continue
        r = recs[i]
        state.apply(r.offset, r.key, r.value, r.ts)
        i += 1
        if i % 5 == 0:
            drained = state.drain()
            published += drained.rollups  # acknowledged first ...
            if drained.checkpoint is not None:
                checkpoint = drained.checkpoint  # ... then the checkpoint
    published += state.drain().rollups
    return published, state


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32),
    st.lists(st.integers(1, 79), max_size=4),
    st.integers(0, 7),
)
def test_any_crash_and_restore_gives_the_uninterrupted_totals(
    seed: int, crashes: list[int], redeliver: int
) -> None:
    recs = _stream(random.Random(seed), 80)
    expected, straight = _run(recs, [], 0)
    got, restored = _run(recs, crashes, redeliver)
    for size in (60_000, HOUR_MS):
        assert totals_of(got, size, dims=True) == totals_of(expected, size, dims=True)
    assert restored.counted == straight.counted
    assert restored.stream_time_ms == straight.stream_time_ms
    assert restored.buckets == straight.buckets
    # and the live read model sums the same, re-publications included
    a, b = UsageView(), UsageView()
    for view, stream in ((a, got), (b, expected)):
        for r in stream:
            view.apply(r.key.record_key(r.source_partition, r.source_offset), r)
    assert a.rows == b.rows


def test_checkpoint_round_trips_as_json() -> None:
    state = fresh()
    for i in range(20):
        state.apply(i, f"c{i}".encode(), response(f"c{i}", T0 + i * 20_000), T0 + i)
    cp = state.drain().checkpoint
    assert cp is not None
    again = UsageCheckpoint.model_validate_json(cp.model_dump_json())
    restored = PartitionUsage.restore(
        again, late_grace_ms=GRACE, dedup_ms=DEDUP, max_future_ms=3_600_000
    )
    assert restored.buckets == state.buckets
    assert restored.next_offset == 20


def test_response_model_is_usable() -> None:
    assert ChatCompletion.model_validate_json(response("z", T0)).id == "z"


def test_dimensions_beyond_the_cap_are_other_per_hour_and_minute_follows_its_hour() -> None:
    state = fresh()  # 2 users, 2 features, 1 value of any other attribute per hour
    users = ["u1", "u2", "u3", "u1", "u4", "u2"]
    for i, user in enumerate(users):  # all in the first hour, minutes apart
        attrs = {"feature": f"f{i}", "env": "prod" if i < 3 else "dev"}
        state.apply(i, f"c{i}".encode(), response(f"c{i}", T0 + i * 60_000, "acme", user, attrs))
    hour = {k: t.requests for k, t in state.buckets.items() if k.window_ms == HOUR_MS}
    by_user = Counter[str]()
    for k, n in hour.items():
        by_user[k.user] += n
    assert by_user == {"u1": 2, "u2": 2, "other": 2}
    features = Counter(dict(k.attributes)["feature"] for k in hour for _ in range(hour[k]))
    assert features == {"f0": 1, "f1": 1, "other": 4}
    assert state.capped == {"user": 2, "attr.feature": 4, "attr.env": 3}
    # each minute bucket carries its hour's decision
    minute_users = Counter[str]()
    for k, t in state.buckets.items():
        if k.window_ms == 60_000:
            minute_users[k.user] += t.requests
    assert minute_users == by_user
    assert {(h, d) for h, d in state.cap_reached} == {
        (T0, "user"),
        (T0, "attr.feature"),
        (T0, "attr.env"),
    }
    # a new hour admits anew; the closed hour's admissions are gone with its buckets
    late = T0 + 2 * HOUR_MS
    state.apply(10, b"n", response("n", late, "acme", "u3", {"feature": "f9"}), late)
    state.drain()
    state.apply(11, b"m", response("m", late + 1, "acme", "u4", {"feature": "f9"}), late)
    users_now = {k.user for k in state.buckets if k.window_start_ms == late}
    assert users_now == {"u3", "u4"}
    assert T0 not in state._admitted


def test_a_bucket_without_user_or_attributes_keeps_its_record_key() -> None:
    from topics import UsageKey

    plain = UsageKey(
        window_start_ms=T0, window_ms=60_000, tenant="a", model="m", provider="p", status="s"
    )
    assert plain.record_key(3) == f"{T0}|60000|a|m|p|s|on-time|3"
    labelled = plain.model_copy(update={"user": "x|3", "attributes": (("env", "a%b"),)})
    assert labelled.record_key(3) == f"{T0}|60000|a|m|p|s|on-time|u=x%7C3|a.env=a%25b|3"
    again = UsageKey.model_validate_json(labelled.model_dump_json())
    assert again == labelled
    assert '"attributes":{"env":"a%b"}' in labelled.model_dump_json()
