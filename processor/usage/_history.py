"""Answer usage queries from the PostgreSQL history when the live read model cannot.

The live model (the rollup topic) keeps ``usage_live_retention_s``; the database that
``chunkstitch usage sink`` writes keeps everything. With ``CHUNKSTITCH_USAGE_DSN`` set, a
query whose range starts before the live retention (or has no start) is answered from the
database, in the same rows (:func:`processor.usage._pg.query_usage`); a recent range is
answered live. A database that does not answer makes the query fall back to the live
model, with a warning in the log (never a 500): the live answer is then what there is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from processor.logs import get_logger
from processor.settings import Settings
from processor.usage._pg import query_usage, redact_dsn

__all__ = ["History", "HistoryUnavailable", "history_rows"]

log = get_logger("chunkstitch.usage.history")


class HistoryUnavailable(ValueError):
    """The database named by the DSN did not answer (the CLI reports it as one line)."""


class History:
    """The database side of usage queries for one process (a small, lazy pool)."""

    def __init__(self, settings: Settings, dsn: str | None = None) -> None:
        secret = settings.usage_dsn.get_secret_value() if settings.usage_dsn else None
        self.dsn = dsn or secret
        self.retention_ms = int(settings.usage_live_retention_s * 1000)
        self.pool: asyncpg.Pool | None = None

    def wanted(self, since_ms: int | None, now_ms: int | None = None) -> bool:
        """Whether this range reaches back beyond the live retention (and a DSN is set)."""
        if not self.dsn:
            return False
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return since_ms is None or since_ms < now - self.retention_ms

    async def answer(
        self,
        *,
        window: str,
        by: Sequence[str],
        since_ms: int | None,
        until_ms: int | None = None,
        filters: Mapping[str, str] | None = None,
        limit: int | None = None,
        fallback: bool = True,
    ) -> list[dict[str, Any]] | None:
        """Rows from the database, or None: not wanted (answer live) or it did not answer.
        A bad parameter raises ``ValueError`` exactly as the live path does."""
        if not self.wanted(since_ms) or self.dsn is None:
            return None
        try:
            if self.pool is None:
                self.pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=4, timeout=5, command_timeout=30
                )
            return await query_usage(self.pool, window, by, since_ms, until_ms, filters, limit)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not fallback:
                raise HistoryUnavailable(
                    f"the usage history at {redact_dsn(self.dsn)} did not answer "
                    f"({type(exc).__name__}: {exc}); check --dsn / CHUNKSTITCH_USAGE_DSN and "
                    "that `chunkstitch usage sink` has run against it"
                ) from None
            log.warning(
                "usage history unavailable; answering from the live rollups",
                database=redact_dsn(self.dsn),
                error=f"{type(exc).__name__}: {exc}",
            )
            return None

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


def history_rows(
    settings: Settings, dsn: str | None, params: Mapping[str, Any]
) -> list[dict[str, Any]] | None:
    """For the CLI (no running loop): rows from the database when the range reaches beyond
    the live retention and a DSN is given (``--dsn`` or ``CHUNKSTITCH_USAGE_DSN``), else
    None (answer live). A database that does not answer raises
    :class:`HistoryUnavailable`: the operator asked for it, so no silent fallback."""
    import asyncio

    history = History(settings, dsn)
    if not history.wanted(params.get("since_ms")):
        return None

    async def run() -> list[dict[str, Any]] | None:
        try:
            return await history.answer(**params, fallback=False)
        finally:
            await history.close()

    return asyncio.run(run())
