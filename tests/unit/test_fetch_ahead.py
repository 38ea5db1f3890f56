"""The fetch-ahead buffer of the batch path (processor/worker/_faust.py, ``_FetchAhead``),
driven by a stand-in for faust's ``_wait_next_records``. The whole path runs on the real
broker in tests/integration (crash, two-worker, backlog, compatibility tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from processor.worker._faust import _FetchAhead


class FakeConsumer:
    """``_wait_next_records`` answers from a queue of fetches, each held until released."""

    def __init__(self) -> None:
        self.fetches: asyncio.Queue[tuple[asyncio.Event, Any]] = asyncio.Queue()
        self.calls = 0
        self.in_flight = 0
        self.flow_active = True
        self.can_resume_flow = asyncio.Event()

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    def stop_flow(self) -> None:
        self.flow_active = False
        self.can_resume_flow.clear()

    def resume_flow(self) -> None:
        self.flow_active = True
        self.can_resume_flow.set()

    def give(self, records: Any) -> asyncio.Event:
        release = asyncio.Event()
        self.fetches.put_nowait((release, records))
        return release

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:  # noqa: ASYNC109
        self.calls += 1
        self.in_flight += 1
        try:
            release, records = await self.fetches.get()
            await release.wait()
            if isinstance(records, BaseException):
                raise records
            return records, None
        finally:
            self.in_flight -= 1


def recs(tp: str, *offsets: int) -> dict[str, list[int]]:
    return {tp: list(offsets)}


@contextlib.asynccontextmanager
async def fetching(c: FakeConsumer, cap: int, tag: Any) -> AsyncIterator[_FetchAhead]:
    ahead = _FetchAhead(c, cap=cap, tag=tag)
    try:
        yield ahead
    finally:
        await ahead.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fetches_made_during_a_round_are_taken_together_in_order() -> None:
    c = FakeConsumer()
    async with fetching(c, cap=100, tag=lambda: "g1") as ahead:
        c.give(recs("a", 1, 2)).set()
        c.give(recs("a", 3)).set()
        await settle()
        entries, stale = await ahead.take("g1")
        assert [r for r, _ in entries] == [recs("a", 1, 2), recs("a", 3)]
        assert not stale


async def test_it_stops_fetching_at_the_cap_until_the_buffer_is_taken() -> None:
    c = FakeConsumer()
    async with fetching(c, cap=3, tag=lambda: 0) as ahead:
        c.give(recs("a", 1, 2)).set()
        c.give(recs("a", 3, 4)).set()  # reaches the cap
        c.give(recs("a", 5)).set()
        await settle()
        assert c.calls == 2, "a third fetch was made with the buffer full"
        entries, _ = await ahead.take(0)
        assert len(entries) == 2
        await settle()
        assert c.calls >= 3
        entries, _ = await ahead.take(0)
        assert [r for r, _ in entries] == [recs("a", 5)]


async def test_a_fetch_begun_under_another_tag_is_stale() -> None:
    c = FakeConsumer()
    tag = ["rebalance-1"]
    async with fetching(c, cap=100, tag=lambda: tag[0]) as ahead:
        release = c.give(recs("a", 7))
        await settle()  # the fetch is in flight under rebalance-1
        tag[0] = "rebalance-2"
        release.set()
        await settle()
        entries, stale = await ahead.take(tag[0])
        assert stale
        assert entries


async def test_pause_waits_for_the_fetch_in_flight_and_drops_it() -> None:
    c = FakeConsumer()
    async with fetching(c, cap=100, tag=lambda: 0) as ahead:
        release = c.give(recs("a", 1))
        await settle()
        assert c.in_flight == 1
        paused = asyncio.ensure_future(ahead.pause())
        await settle()
        assert not paused.done(), "pause returned with a fetch still in flight"
        release.set()
        await paused
        assert c.in_flight == 0
        calls = c.calls
        c.give(recs("a", 2)).set()
        await settle()
        assert c.calls == calls, "a fetch was started while paused"
        ahead.resume()
        await settle()
        entries, stale = await ahead.take(0)
        assert [r for r, _ in entries] == [recs("a", 2)], "the paused fetch was not dropped"
        assert not stale


async def test_an_error_of_the_fetch_reaches_the_drain_loop() -> None:
    c = FakeConsumer()
    async with fetching(c, cap=100, tag=lambda: 0) as ahead:
        c.give(RuntimeError("consumer stopped")).set()
        with pytest.raises(RuntimeError, match="consumer stopped"):
            await asyncio.wait_for(ahead.take(0), 5)


async def test_an_empty_fetch_still_wakes_the_drain_loop() -> None:
    # the drain loop checks for a stop between fetches, as faust's loop does
    c = FakeConsumer()
    async with fetching(c, cap=100, tag=lambda: 0) as ahead:
        c.give({}).set()
        entries, stale = await asyncio.wait_for(ahead.take(0), 5)
        assert entries == []
        assert not stale


async def test_a_fetch_waits_for_the_flow_and_is_tagged_after_it() -> None:
    # The first fetch of a new assignment must be current: tagged once the flow resumes,
    # not with the rebalance that stopped it (it would be dropped and sought back).
    c = FakeConsumer()
    c.stop_flow()
    mark = {"tag": "old"}
    async with fetching(c, cap=100, tag=lambda: mark["tag"]) as ahead:
        await settle()
        assert c.calls == 0  # no fetch while the flow is stopped
        mark["tag"] = "new"
        c.resume_flow()
        c.give(recs("a", 7)).set()
        entries, stale = await asyncio.wait_for(ahead.take("new"), 2)
        assert [r for r, _ in entries] == [recs("a", 7)]
        assert not stale
