"""Usage rollups: the worker plug-in, its bounded state, and the read model (HTTP and CLI)."""

from processor.usage._plugin import load_checkpoint, register
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
