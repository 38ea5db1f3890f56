"""No hang, ever: every wait on the broker is named, measured and bounded.

A stream processor that is alive but processes nothing is the worst failure there is.
The worker registers what it can wait for (acknowledgements of a sealed round, the group
coordinator vouching for it, a rebalance to finish); the watchdog timer checks them, and
one that outlasts ``CHUNKSTITCH_STALL_TIMEOUT_S`` stops the worker non-zero with a
critical line naming what it waited for (the orchestrator restarts it; unacknowledged
records are replayed). ``/readyz`` turns 503 while any wait is long.

A second, thread-based check covers the event loop itself not running (a blocking call,
a livelock): the loop beats every second; a beat missing for the stall timeout ends the
process from the thread. A thread that finds its own sleep much longer than asked was
frozen with the process (SIGSTOP, a suspended VM), not stalled, and starts counting anew.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from processor.logs import get_logger

__all__ = ["LoopMonitor", "Watchdog"]

log = get_logger("chunkstitch.worker")

EXIT_STALLED = 70
"""Exit code of a worker stopped by the watchdog (EX_SOFTWARE)."""


@dataclass
class Watchdog:
    """Named waits, each a function ``now -> seconds waited so far`` (0: not waiting)."""

    stall_timeout_s: float
    clock: Callable[[], float] = time.monotonic
    waits: dict[str, Callable[[float], float]] = field(default_factory=dict)

    def add(self, what: str, age: Callable[[float], float]) -> None:
        self.waits[what] = age

    def current(self, now: float | None = None) -> dict[str, float]:
        """Every wait in progress and how long it has lasted (seconds)."""
        now = self.clock() if now is None else now
        out = {}
        for what, age in self.waits.items():
            seconds = age(now)
            if seconds > 0:
                out[what] = seconds
        return out

    def stalled(self, now: float | None = None) -> tuple[str, float] | None:
        """The longest wait beyond the stall timeout, if any."""
        over = [(s, w) for w, s in self.current(now).items() if s >= self.stall_timeout_s]
        if not over:
            return None
        seconds, what = max(over)
        return what, seconds

    def long_waits(self, threshold_s: float, now: float | None = None) -> list[str]:
        return sorted(w for w, s in self.current(now).items() if s >= threshold_s)


class LoopMonitor:
    """Ends the process when the event loop stops beating (see the module docstring)."""

    def __init__(self, stall_timeout_s: float, interval_s: float = 1.0) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.interval_s = interval_s
        self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="chunkstitch-loop-monitor", daemon=True
        )

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        before = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - before > self.interval_s + 5.0:
                self.last_beat = now  # the whole process was frozen: not a stall
            before = now
            silent = now - self.last_beat
            if silent >= self.stall_timeout_s:
                log.critical(
                    "stopping the worker: its event loop has not run for "
                    f"{silent:.0f}s (CHUNKSTITCH_STALL_TIMEOUT_S={self.stall_timeout_s:g}); "
                    "the orchestrator restarts it and unacknowledged records are replayed",
                    waited_for="the event loop",
                )
                sys.stderr.flush()
                os._exit(EXIT_STALLED)
