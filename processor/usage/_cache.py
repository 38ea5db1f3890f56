"""Encoded ``/usage`` pages, reused while the read model has not changed.

Dashboards poll the same few panels from many clients: without a cache every request
walks the view and encodes a page of up to a few hundred rows (most of the 3-5 CPU ms a
request cost the usage server). :class:`PageCache` keeps the JSON bytes of a page under
the query's canonical key (:meth:`~processor.usage._view.UsageQuery.cache_key`: relative
times stay relative, the cursor is part of it) and the view's ``version`` (bumped whenever
rollups are applied). An entry is served only while

* the view's version is the one it was computed at (no rollup applied since), and
* it is younger than ``max_age_s`` (``CHUNKSTITCH_USAGE_CACHE_S``, 1 s by default), so a
  relative ``since=3h`` page is never staler than that even when no rollup arrives;

``max_age_s=0`` turns it off. At most ``entries`` pages (:data:`ENTRIES`, 256) are kept,
the least recently used dropped first.

The usage server looks up, computes and stores a page without awaiting in between, on
its one event loop, so concurrent identical misses compute once: the first request's
page is stored before the next handler runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["ENTRIES", "PageCache"]

ENTRIES = 256
"""Pages kept at most (about 256 x 100 KB for the largest dashboard pages)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    version: int
    at: float
    page: bytes


class PageCache:
    """Least-recently-used pages by (canonical query, view version), each for at most
    ``max_age_s`` seconds of ``clock``."""

    def __init__(
        self,
        max_age_s: float,
        entries: int = ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if entries < 1:
            raise ValueError(f"entries={entries}: a page cache holds at least 1 page")
        self.max_age_s = max_age_s
        self.entries = entries
        self.clock = clock
        self._pages: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, key: Hashable, version: int) -> bytes | None:
        """The page stored for ``key`` at ``version`` and younger than the max age."""
        if self.max_age_s <= 0:
            return None
        entry = self._pages.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.version != version or self.clock() - entry.at >= self.max_age_s:
            del self._pages[key]
            self.misses += 1
            return None
        self._pages.move_to_end(key)
        self.hits += 1
        return entry.page

    def put(self, key: Hashable, version: int, page: bytes) -> None:
        """Keep ``page`` for ``key`` at ``version`` (from now), dropping the least
        recently used page beyond the bound."""
        if self.max_age_s <= 0:
            return
        self._pages[key] = _Entry(version, self.clock(), page)
        self._pages.move_to_end(key)
        while len(self._pages) > self.entries:
            self._pages.popitem(last=False)

    def page(self, key: Hashable, version: int, compute: Callable[[], bytes]) -> bytes:
        """The stored page, else ``compute()``'s, stored."""
        page = self.get(key, version)
        if page is None:
            page = compute()
            self.put(key, version, page)
        return page

    def clear(self) -> None:
        """Forget every page (the view was replaced: its versions start over)."""
        self._pages.clear()
