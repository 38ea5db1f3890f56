"""Supervision of the worker's agents and timers: no silent stall.

How faust reports a dead agent, and why that is not enough: faust runs each agent
coroutine in ``Agent._execute_actor``; an exception there is passed to the agent's
``on_error`` (none by default), then ``ActorRef.crash`` marks that actor crashed and
wakes the agent's mode supervisor. Nothing stops the worker: the process keeps its web
server (``/healthz`` answers) and its other agents and timers, and the dead agent's
partitions are never consumed again. A faust timer that raises simply ends its loop
(``Service.timer`` re-raises into a task nobody awaits). Both are silent stalls.

:meth:`Supervisor.guard` wraps the coroutine function itself: if it raises, it logs one
critical line (what died, the error, that the worker stops and the orchestrator restarts
it) and stops the whole worker through ``app.crash``: mode marks the app and its
parents crashed, ``faust.Worker`` stops every service, and ``execute_from_commandline``
re-raises the crash reason inside mode's ``exiting()``, which exits with status 1
(``EX_FAILURE``). That is the same path ``_stop_worker`` in ``_app.py`` uses when a
round's outputs cannot be made durable. A restarted worker recovers from its committed
offsets and checkpoints.

``CancelledError`` is not a failure: faust cancels agents on shutdown and on rebalance
(and restarts them itself).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import faust

from processor.logs import get_logger

__all__ = ["Supervisor", "supervisor"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

log = get_logger("chunkstitch.worker")

_pending: set[asyncio.Future[Any]] = set()


class Supervisor:
    """Which guarded agents and timers run, and stopping the worker when one dies."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self._registered: list[str] = []
        self._active: dict[str, int] = {}
        self._started: set[str] = set()
        self._dead: dict[str, str] = {}
        self.stop: Callable[[str, BaseException], None] = self._crash_app
        """What a failure does (the default crashes the app: exit status 1)."""

    def register(self, name: str) -> None:
        """``name`` is expected to be running once the worker has started."""
        if name not in self._registered:
            self._registered.append(name)

    def not_running(self) -> list[str]:
        """Registered names that are not running now: never started yet, or died."""
        return [n for n in self._registered if n in self._dead or n not in self._started]

    def dead(self) -> dict[str, str]:
        """What died, with its error."""
        return dict(self._dead)

    def guard(self, name: str) -> Callable[[F], F]:
        """Decorator for an agent or timer coroutine function. While the coroutine runs,
        ``name`` counts as running (a timer between two runs too, as long as none has
        raised). If it raises anything but ``CancelledError``, log.critical what died,
        the error and that the worker stops, then stop the whole worker with a non-zero
        exit code."""
        self.register(name)

        def decorate(fun: F) -> F:
            @functools.wraps(fun)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                self._started.add(name)
                self._active[name] = self._active.get(name, 0) + 1
                try:
                    return await fun(*args, **kwargs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._dead[name] = f"{type(exc).__name__}: {exc}"
                    log.critical(
                        f"{name} died; stopping the worker so that the orchestrator "
                        "restarts it (it recovers from its committed offsets and checkpoints)",
                        component=name,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    self.stop(name, exc)
                    raise
                finally:
                    self._active[name] -= 1

            return cast(F, guarded)

        return decorate

    def _crash_app(self, name: str, exc: BaseException) -> None:
        task = asyncio.ensure_future(self.app.crash(exc))
        _pending.add(task)
        task.add_done_callback(_pending.discard)


def supervisor(app: faust.App) -> Supervisor:
    """The app's one :class:`Supervisor`, created on the first call."""
    existing = getattr(app, "_chunkstitch_supervisor", None)
    if isinstance(existing, Supervisor):
        return existing
    created = Supervisor(app)
    app._chunkstitch_supervisor = created  # type: ignore[attr-defined]
    return created
