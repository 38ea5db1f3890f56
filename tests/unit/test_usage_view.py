"""The read model and the one query model of /usage and `chunkstitch usage`."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.core import combine, percentile, percentiles, result
from processor.usage import QueryError, UsageQuery, UsageView, window_label
from tests.helpers.rollups import rollup
from topics import UsageKey, UsageTotals

MIN = 60_000
HOUR = 3_600_000
T0 = 1_760_000_000_000 // HOUR * HOUR
NOW = T0 + 10 * HOUR


def requests(page: dict[str, object]) -> list[tuple[int, str, int]]:
    rows = page["rows"]
    assert isinstance(rows, list)
    return [
        (r["key"]["window_start_ms"], r["key"]["tenant"], r["totals"]["requests"]) for r in rows
    ]


def test_absolute_totals_replace_and_partitions_add_up() -> None:
    view = UsageView()
    view.apply(*rollup(T0, 2))
    view.apply(*rollup(T0, 5))  # the same key again: the newer total replaces it
    view.apply(*rollup(T0, 5))  # a re-publication changes nothing
    view.apply(*rollup(T0, 3, partition=1))
    q = UsageQuery.parse({"window": "1m", "by": "tenant"}, now_ms=NOW)
    assert requests(view.query(q)) == [(T0, "acme", 8)]


def test_hour_rows_feed_hours_and_days_and_late_increments_add() -> None:
    view = UsageView()
    view.apply(*rollup(T0, 4, size=HOUR))
    view.apply(*rollup(T0 + HOUR, 1, size=HOUR))
    view.apply(*rollup(T0, 1, size=HOUR, late=True, offset=7))
    view.apply(*rollup(T0, 1, size=HOUR, late=True, offset=9))
    day = view.query(UsageQuery.parse({"window": "1d", "by": "tenant"}, now_ms=NOW))
    assert sum(r["totals"]["requests"] for r in day["rows"]) == 7
    hours = view.query(UsageQuery.parse({"window": "1h", "by": "tenant"}, now_ms=NOW))
    assert requests(hours) == [(T0, "acme", 4), (T0, "acme", 2), (T0 + HOUR, "acme", 1)]


def test_forgotten_keys_ignore_re_publications_but_take_new_late_increments() -> None:
    view = UsageView(minute_keep_ms=HOUR, key_keep_ms=HOUR)
    view.apply(*rollup(T0, 3))
    view.apply(*rollup(T0 + 3 * HOUR, 1))  # moves the key horizon past T0
    view.apply(*rollup(T0, 3))  # a final re-published after a crash: already counted
    view.apply(*rollup(T0, 1, late=True, offset=50))  # new late data: counted
    view.apply(*rollup(T0, 1, late=True, offset=50))  # its re-publication: not again
    assert view.ignored == 2
    # the 1-minute rows older than minute_keep_ms are gone; the query still works
    page = view.query(UsageQuery.parse({"window": "1m", "by": "tenant"}, now_ms=NOW))
    assert requests(page) == [(T0 + 3 * HOUR, "acme", 1)]


def test_pages_follow_the_cursor_and_cover_everything_once() -> None:
    view = UsageView()
    for i in range(30):
        for tenant in ("a", "b", "c"):
            view.apply(*rollup(T0 + i * MIN, i + 1, tenant=tenant))
    seen: list[tuple[int, str, int]] = []
    params: dict[str, object] = {"window": "1m", "by": "tenant", "limit": 7}
    pages = 0
    while True:
        page = view.query(UsageQuery.parse(params, now_ms=NOW))
        seen += requests(page)
        pages += 1
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == 90
    assert len(set(seen)) == 90
    assert pages == 13
    since = view.query(
        UsageQuery.parse({"window": "1m", "since": T0 + 28 * MIN, "by": "tenant"}, now_ms=NOW)
    )
    assert {s for s, _, _ in requests(since)} == {T0 + 28 * MIN, T0 + 29 * MIN}


def test_query_times_iso_epoch_and_relative() -> None:
    iso = UsageQuery.parse({"since": "2025-10-09T08:00:00Z", "until": "1760000000000"}, now_ms=NOW)
    assert (iso.since_ms, iso.until_ms) == (1_759_996_800_000, 1_760_000_000_000)
    rel = UsageQuery.parse({"since": "2h"}, now_ms=NOW)
    assert rel.since_ms == NOW - 2 * HOUR
    assert UsageQuery.parse({"by": "model,tenant"}).by == ("tenant", "model")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": "5m"}, "window"),
        ({"by": "colour"}, "cannot group by ['colour']"),
        ({"since": "yesterday"}, "since='yesterday' is not a time"),
        ({"since": "99999999999999999999"}, "out of range"),
        ({"since": "2h", "until": "3h"}, "since must be before until"),
        ({"limit": "0"}, "limit"),
        ({"limit": "20000"}, "above the maximum"),
        ({"cursor": "garbage"}, "cursor is not one this query returned"),
        ({"colour": "red"}, "unknown parameter colour"),
    ],
)
def test_bad_queries_say_what_is_wrong(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)) as info:
        UsageQuery.parse(params, now_ms=NOW)
    assert "\n" not in str(info.value)


def test_window_labels_never_raise() -> None:
    assert window_label(T0) == "2025-10-09 08:00"
    assert window_label(10**30).startswith("@")
    assert window_label(-5).startswith("@")


def test_a_late_increment_at_an_absurd_time_does_not_push_recent_rows_out() -> None:
    view = UsageView(minute_keep_ms=HOUR, key_keep_ms=HOUR)
    view.apply(*rollup(T0, 2))
    view.apply(*rollup(10**30 // MIN * MIN, 1, late=True, offset=3))
    view.apply(*rollup(T0, 4))  # the open bucket re-published: still replaces its total
    page = view.query(UsageQuery.parse({"window": "1m", "by": "tenant"}, now_ms=NOW))
    assert requests(page)[0] == (T0, "acme", 4)
    assert len(page["rows"]) == 2


def test_rows_are_what_the_rollup_model_gives() -> None:
    from processor.usage._view import _row

    _, r = rollup(T0, 3)
    totals = r.totals.model_copy(update={"rate_tokens": 30, "rate_duration_ms": 1500})
    want = result(r.key, totals).model_dump(
        exclude={"source_partition", "source_offset", "as_of_offset", "final"}
    )
    assert _row(T0, MIN, ("acme", "m", "p", "complete", "unknown", "False"), dict(totals)) == want


@given(st.lists(st.integers(0, 50), min_size=14, max_size=14))
def test_the_three_quantiles_in_one_walk_are_the_percentiles(buckets: list[int]) -> None:
    qs = (0.5, 0.95, 0.99)
    for hist in (tuple(buckets), (0,) * 13 + (buckets[0],)):
        assert percentiles(hist, qs) == tuple(percentile(hist, q) for q in qs)


def test_a_grouped_row_sums_its_rows_as_combine_does() -> None:
    view = UsageView()
    parts = []
    for i, model in enumerate(("m1", "m2", "m3")):
        key = UsageKey(
            window_start_ms=T0,
            window_ms=MIN,
            tenant="acme",
            model=model,
            provider="p",
            status="complete",
        )
        totals = UsageTotals(
            requests=i + 1,
            prompt_tokens=10 * i,
            rate_tokens=7 * i,
            rate_duration_ms=100 * i,
            cost_nano_usd=3 * i,
            ttfc_ms_buckets=tuple((i + j) % 3 for j in range(14)),
            duration_ms_buckets=tuple(j * i for j in range(14)),
        )
        view.apply(key.record_key(0), result(key, totals, 0))
        parts.append(totals)
    page = view.query(UsageQuery.parse({"window": "1m", "by": "tenant"}, now_ms=NOW))
    summed = combine(combine(parts[0], parts[1]), parts[2])
    key = UsageKey(
        window_start_ms=T0,
        window_ms=MIN,
        tenant="acme",
        model="*",
        provider="*",
        status="*",
        user="*",
    )
    want = result(key, summed).model_dump(
        exclude={"source_partition", "source_offset", "as_of_offset", "final"}
    )
    assert page["rows"] == [want]


def test_a_total_from_an_older_state_never_replaces_a_newer_one() -> None:
    view = UsageView()
    key, newer = rollup(T0, 9)
    _, older = rollup(T0, 4)
    view.apply(key, newer.model_copy(update={"as_of_offset": 120, "final": True}))
    view.apply(key, older.model_copy(update={"as_of_offset": 80}))  # a zombie's late write
    page = view.query(UsageQuery.parse({"window": "1m", "by": "tenant"}, now_ms=NOW))
    assert requests(page) == [(T0, "acme", 9)]


def test_group_and_filter_by_user_and_attributes() -> None:
    view = UsageView(minute_keep_ms=HOUR, key_keep_ms=HOUR)
    _, base = rollup(T0, 1)
    for i, (user, feature, n) in enumerate(
        [("alice", "chat", 2), ("bob", "chat", 3), ("alice", None, 5), ("unknown", "x", 7)]
    ):
        attrs = {"feature": feature} if feature else {}
        key = base.key.model_copy(update={"user": user, "attributes": tuple(attrs.items())})
        r = base.model_copy(
            update={"key": key, "totals": base.totals.model_copy(update={"requests": n})}
        )
        view.apply(key.record_key(0) + str(i), r)

    def q(**params: str) -> dict[tuple[str, str], int]:
        page = view.query(UsageQuery.parse({"window": "1m", **params}, now_ms=NOW))
        return {
            (r["key"]["user"], r["key"]["attributes"].get("feature", "-")): r["totals"]["requests"]
            for r in page["rows"]
        }

    assert q(by="user") == {("alice", "-"): 7, ("bob", "-"): 3, ("unknown", "-"): 7}
    assert q(by="attr.feature") == {("*", "chat"): 5, ("*", "unknown"): 5, ("*", "x"): 7}
    assert q(by="user,attr.feature", user="alice") == {
        ("alice", "chat"): 2,
        ("alice", "unknown"): 5,
    }
    assert q(by="user", **{"attr.feature": "chat"}) == {("alice", "-"): 2, ("bob", "-"): 3}
    with pytest.raises(QueryError, match="attribute name"):
        UsageQuery.parse({"by": "attr.Bad"}, now_ms=NOW)
    with pytest.raises(QueryError, match="cannot group by"):
        UsageQuery.parse({"by": "users"}, now_ms=NOW)
