"""malloc_trim hands the free pages inside the C heap back to the system (glibc only)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from processor._malloc import malloc_trim, start_trimming


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


def test_freed_heap_pinned_by_a_few_live_blocks_goes_back_to_the_system() -> None:
    if malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    before = _rss_anon_mb()
    # 2,000-byte objects come from glibc's heap (above pymalloc's 512, below mmap's
    # threshold); every 64th stays alive, so the heap cannot shrink from its top
    blocks = [bytes(2000) for _ in range(60_000)]
    pinned = blocks[::64]
    del blocks
    held = _rss_anon_mb()
    assert held - before > 80  # the freed blocks are still resident: what the soak saw
    assert malloc_trim() is True
    assert _rss_anon_mb() - before < (held - before) / 2
    assert len(pinned) == 938


def test_trimming_thread_runs_until_stopped_and_not_at_all_when_off() -> None:
    assert start_trimming(0) is None
    if malloc_trim() is None:
        pytest.skip("not glibc: no thread")
    stop = threading.Event()
    thread = start_trimming(0.01, stop)
    assert thread is not None
    assert thread.daemon
    assert thread.is_alive()
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
