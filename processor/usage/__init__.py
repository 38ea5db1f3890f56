"""Usage rollups: the worker plug-in, and reading rollups back (HTTP and CLI)."""

from processor.usage._plugin import register
from processor.usage._read import DIMENSIONS, aggregate, read_rollups
from processor.usage._state import PartitionUsage

__all__ = ["DIMENSIONS", "PartitionUsage", "aggregate", "read_rollups", "register"]
