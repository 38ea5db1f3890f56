"""The page cache of /usage: a page is reused only while the view's version is unchanged
and it is younger than the max age; bounded; keyed by the canonical query."""

from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from processor.settings import Settings
from processor.usage import UsageQuery
from processor.usage._cache import ENTRIES, PageCache
from processor.usage._serve import UsageService
from processor.usage._view import _encode_cursor
from tests.helpers.rollups import rollup

MIN = 60_000
HOUR = 3_600_000
NOW = 1_760_000_000_000 // HOUR * HOUR


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_is_reused_within_its_version_and_age() -> None:
    clock = Clock()
    cache = PageCache(1.0, clock=clock)
    computed: list[int] = []

    def compute() -> bytes:
        computed.append(1)
        return b"page %d" % len(computed)

    assert cache.page("q", 7, compute) == b"page 1"
    clock.now += 0.9
    assert cache.page("q", 7, compute) == b"page 1"
    assert (cache.hits, cache.misses, len(computed)) == (1, 1, 1)
    assert cache.page("other", 7, compute) == b"page 2"  # another query: its own page


def test_a_version_bump_or_the_max_age_makes_it_a_miss() -> None:
    clock = Clock()
    cache = PageCache(1.0, clock=clock)
    cache.put("q", 1, b"v1")
    assert cache.get("q", 2) is None  # rollups applied since
    assert cache.get("q", 1) is None  # and the stale page is gone, not kept for version 1
    cache.put("q", 2, b"v2")
    clock.now += 0.999
    assert cache.get("q", 2) == b"v2"
    clock.now += 0.001  # 1.0 s old: too old, even though nothing changed
    assert cache.get("q", 2) is None


def test_max_age_zero_turns_it_off() -> None:
    cache = PageCache(0.0)
    cache.put("q", 1, b"page")
    assert cache.get("q", 1) is None
    assert len(cache) == 0


def test_the_bound_drops_the_least_recently_used_page() -> None:
    cache = PageCache(60.0, entries=3, clock=Clock())
    for key in "abc":
        cache.put(key, 0, key.encode())
    assert cache.get("a", 0) == b"a"  # a is now the most recently used
    cache.put("d", 0, b"d")
    assert len(cache) == 3
    assert cache.get("b", 0) is None
    assert [cache.get(k, 0) for k in "acd"] == [b"a", b"c", b"d"]
    assert PageCache(1.0).entries == ENTRIES == 256
    with pytest.raises(ValueError, match="at least 1 page"):
        PageCache(1.0, entries=0)


def _key(params: dict[str, str], now_ms: int) -> object:
    return UsageQuery.parse(params, now_ms=now_ms).cache_key(params)


def test_the_key_keeps_relative_times_relative_and_includes_the_cursor() -> None:
    a = {"window": "1m", "by": "tenant", "since": "3h"}
    # parsed a minute apart, the same relative query: one key
    assert _key(a, NOW) == _key(a, NOW + MIN)
    assert _key(a, NOW) == _key({"since": "180m", "by": "tenant"}, NOW)  # normalised
    assert _key(a, NOW) != _key({**a, "since": "2h"}, NOW)
    # an absolute since is its epoch ms, whatever its spelling
    iso = {"since": "2025-10-09T08:00:00Z"}
    ms = {"since": str(UsageQuery.parse(iso).since_ms)}
    assert _key(iso, NOW) == _key(ms, NOW + HOUR)
    assert _key(iso, NOW) != _key(a, NOW)
    assert _key({"by": "model,tenant"}, NOW) == _key({"by": "tenant,model"}, NOW)
    first = {"window": "1m", "limit": "1"}
    pages = [first] + [{**first, "cursor": _encode_cursor("1m", t, ("a",))} for t in (1, 2)]
    assert len({_key(page, NOW) for page in pages}) == 3  # every page its own entry


async def test_the_server_answers_from_the_cache_until_the_view_changes() -> None:
    service = UsageService(Settings(usage_cache_s=1.0, api_token=None))
    clock = Clock()
    service.cache.clock = clock
    view = service.view
    start = (NOW // MIN) * MIN
    view.apply(*rollup(start, 2, tenant="a"))
    view.caught_up = True

    async def requests() -> list[tuple[str, int]]:
        got = await client.get("/usage", params={"window": "1m", "by": "tenant", "since": "0"})
        assert got.status == 200, await got.text()
        rows = orjson.loads(await got.read())["rows"]
        return [(r["key"]["tenant"], r["totals"]["requests"]) for r in rows]

    async with TestClient(TestServer(service.application())) as client:
        assert await requests() == [("a", 2)]
        assert await requests() == [("a", 2)]
        assert service.cache.hits == 1
        view.apply(*rollup(start, 5, tenant="a"))  # a new total: the next answer has it
        assert await requests() == [("a", 5)]
        assert service.cache.hits == 1
        assert await requests() == [("a", 5)]
        assert service.cache.hits == 2
        clock.now += 1.0
        assert await requests() == [("a", 5)]
        assert service.cache.hits == 2  # too old: computed again


def test_the_view_version_moves_when_rollups_are_applied() -> None:
    service = UsageService(Settings())
    view = service.view
    key, value = rollup(NOW, 1)
    view.apply_records([(None, None), (b"k", b"not a rollup")])  # nothing applied
    assert view.version == 0
    view.apply_records([(key.encode(), value.model_dump_json().encode())])
    assert view.version == 1
    view.apply(key, value)
    assert view.version == 2
