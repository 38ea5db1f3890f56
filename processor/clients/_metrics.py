"""Prometheus counters of the client libraries (process-wide, created once)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["CONSUMER_SKIPPED", "PUBLISHER_FAILED"]

PUBLISHER_FAILED = Counter(
    "chunkstitch_publisher_failed_total",
    "Chunks and end markers the publisher could not deliver (reported, never silent).",
    ["reason"],
)
CONSUMER_SKIPPED = Counter(
    "chunkstitch_consumer_skipped_total",
    "Finished-response records the consumer skipped: invalid or duplicate.",
    ["reason"],
)
