"""The agent/timer supervisor: what runs, what died, and that a death stops the worker
(the exit status itself is proven on a real worker in tests/integration)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import faust
import pytest

from processor.worker._supervise import Supervisor, supervisor


def _app(tmp_path: Path) -> faust.App:
    return faust.App("cs-unit-supervise", broker="kafka://127.0.0.1:1", datadir=str(tmp_path))


async def test_a_raising_coroutine_is_reported_dead_and_stops_the_worker(tmp_path: Path) -> None:
    app = _app(tmp_path)
    sup = supervisor(app)
    assert supervisor(app) is sup
    stopped: list[tuple[str, str]] = []
    sup.stop = lambda name, exc: stopped.append((name, str(exc)))

    @sup.guard("usage publisher")
    async def tick() -> None:
        raise RuntimeError("broker said no")

    @sup.guard("usage agent")
    async def agent() -> None:
        await asyncio.sleep(0)

    sup.register("stitch agent")
    assert sup.not_running() == ["usage publisher", "usage agent", "stitch agent"]
    await agent()
    with pytest.raises(RuntimeError):
        await tick()
    assert stopped == [("usage publisher", "broker said no")]
    assert sup.not_running() == ["usage publisher", "stitch agent"]
    assert sup.dead() == {"usage publisher": "RuntimeError: broker said no"}


async def test_cancellation_is_not_a_death(tmp_path: Path) -> None:
    sup = Supervisor(_app(tmp_path))
    sup.stop = lambda name, exc: pytest.fail("a cancelled agent must not stop the worker")

    @sup.guard("usage agent")
    async def agent() -> None:
        await asyncio.sleep(10)

    task = asyncio.ensure_future(agent())
    await asyncio.sleep(0.01)
    assert sup.not_running() == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sup.not_running() == []
    assert sup.dead() == {}
