"""Usage rollups: the worker plug-in, its bounded state, and the read model (HTTP and CLI)."""

from typing import TYPE_CHECKING, Any

from processor.usage._state import PartitionUsage
from processor.usage._view import (
    DIMENSIONS,
    QueryError,
    UsageQuery,
    UsageView,
    load_view,
    query_rollups,
    window_label,
)

if TYPE_CHECKING:
    from processor.usage._plugin import load_checkpoint, register

__all__ = [
    "DIMENSIONS",
    "PartitionUsage",
    "QueryError",
    "UsageQuery",
    "UsageView",
    "load_checkpoint",
    "load_view",
    "query_rollups",
    "register",
    "window_label",
]


def __getattr__(name: str) -> Any:
    """The worker plug-in on first use only: it imports faust and aiohttp, which the
    ``usage`` command and the read model do not need (half a second of every CLI start)."""
    if name in ("load_checkpoint", "register"):
        from processor.usage import _plugin

        return getattr(_plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
