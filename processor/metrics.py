"""Prometheus metrics of the worker (``GET /metrics`` on its web port)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "CHUNKS",
    "COMPLETIONS",
    "COST",
    "DEAD_LETTERS",
    "DURATION",
    "HEADERS_IGNORED",
    "IN_FLIGHT",
    "LAG",
    "OVERSIZE_RESPONSES",
    "PRICE_DATA",
    "REGISTRY",
    "REPLAY_SKIPPED",
    "TOKENS",
    "TTFC",
    "USAGE_CAPPED",
    "USAGE_CHECKPOINTS",
    "USAGE_COMPLETIONS",
    "USAGE_DEDUP_IDS",
    "USAGE_DIMENSION_TOKENS",
    "USAGE_LATE",
    "USAGE_OPEN_BUCKETS",
    "USAGE_RECOVERY",
    "render",
]

# No ``*_created`` series (one per labelled child: noise that doubles the series count).
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
# Process (RSS, CPU, open fds), GC and platform figures next to chunkstitch's own.
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

CHUNKS = Counter(
    "chunkstitch_chunks_consumed", "Chunk records consumed by the worker.", registry=REGISTRY
)
COMPLETIONS = Counter(
    "chunkstitch_completions_emitted",
    "Finished responses emitted, by status and detection rule.",
    ["status", "rule"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "chunkstitch_dead_letters",
    "Records sent to the dead-letter topic, by reason.",
    ["reason"],
    registry=REGISTRY,
)
REPLAY_SKIPPED = Counter(
    "chunkstitch_replay_skipped",
    "Replayed chunks of completions already emitted (recognised via the ledger).",
    registry=REGISTRY,
)
OVERSIZE_RESPONSES = Counter(
    "chunkstitch_oversize_responses",
    "Responses over max_response_bytes, emitted as errors without their message bodies.",
    registry=REGISTRY,
)
# Input robustness (issue 12): headers outside their plausible range.
HEADERS_IGNORED = Counter(
    "chunkstitch_headers_ignored",
    "Records (cs-started-at) or completions (cs-user, cs-attr-*: not valid, or not in "
    "CHUNKSTITCH_USAGE_ATTRIBUTES) whose chunkstitch header was ignored, by header "
    "(cs-started-at before 2000 or more than a day ahead of the record's timestamp).",
    ["header"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "chunkstitch_streams_in_flight", "Completions being assembled right now.", registry=REGISTRY
)
LAG = Gauge(
    "chunkstitch_consumer_lag",
    "Records between the last consumed offset and the partition end (per partition).",
    ["partition"],
    registry=REGISTRY,
)


TOKENS = Counter(
    "chunkstitch_tokens",
    "Tokens of finished responses by tenant, model, provider and kind (prompt/completion); "
    "label combinations beyond CHUNKSTITCH_METRICS_LABEL_CAP are counted as 'other'. "
    "Counted when a worker folds a response into its usage state for the first time "
    "(a rebuild after a restart counts what the dead process had not checkpointed).",
    ["tenant", "model", "provider", "kind"],
    registry=REGISTRY,
)
USAGE_COMPLETIONS = Counter(
    "chunkstitch_usage_completions",
    "Finished responses folded into the usage rollups, by status (with or without usage).",
    ["status"],
    registry=REGISTRY,
)
USAGE_LATE = Counter(
    "chunkstitch_usage_late_completions",
    "Completions counted after their window closed (published as late increments); "
    "reason 'implausible' when the event time was before 2000 or far ahead of the record.",
    ["reason"],
    registry=REGISTRY,
)
USAGE_CHECKPOINTS = Counter(
    "chunkstitch_usage_checkpoints",
    "Usage checkpoints written (after the rollups they reflect were acknowledged).",
    registry=REGISTRY,
)
USAGE_RECOVERY = Histogram(
    "chunkstitch_usage_recovery_seconds",
    "Time to restore one responses partition's usage state (checkpoint + catch-up).",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
USAGE_OPEN_BUCKETS = Gauge(
    "chunkstitch_usage_open_buckets",
    "Open usage buckets held in memory (windows within the late grace).",
    registry=REGISTRY,
)
USAGE_DEDUP_IDS = Gauge(
    "chunkstitch_usage_dedup_ids",
    "Response ids held in the usage dedup horizon (CHUNKSTITCH_USAGE_DEDUP_S).",
    registry=REGISTRY,
)


USAGE_CAPPED = Counter(
    "chunkstitch_usage_capped",
    "Completions whose user or attribute value was counted as 'other': scope 'rollups' "
    "beyond the per-partition-and-hour cap (CHUNKSTITCH_USAGE_MAX_USERS, "
    "CHUNKSTITCH_USAGE_MAX_ATTRIBUTE_VALUES or name:cap), 'metrics' beyond the same cap of "
    "distinct label values per process.",
    ["dimension", "scope"],
    registry=REGISTRY,
)
USAGE_DIMENSION_TOKENS = Counter(
    "chunkstitch_usage_dimension_tokens",
    "Tokens of finished responses by one usage dimension (dimension 'user' or "
    "'attr.<name>', its value; 'other' beyond the cap) and kind (prompt/completion).",
    ["dimension", "value", "kind"],
    registry=REGISTRY,
)
COST = Counter(
    "chunkstitch_cost_usd",
    "Cost of finished responses in USD by tenant, model, provider and kind: 'reported' by "
    "the provider, or 'estimated' from the price database (genai-prices) where none was.",
    ["tenant", "model", "provider", "kind"],
    registry=REGISTRY,
)


PRICE_DATA = Gauge(
    "chunkstitch_price_data_info",
    "The price data behind chunkstitch_cost_usd_total{kind='estimated'} (value 1).",
    ["version"],
    registry=REGISTRY,
)


_LATENCY_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFC = Histogram(
    "chunkstitch_time_to_first_chunk_seconds",
    "Request start to first chunk, of every finished response that has it, by status.",
    ["status"],
    buckets=_LATENCY_S,
    registry=REGISTRY,
)
DURATION = Histogram(
    "chunkstitch_completion_duration_seconds",
    "Request start (or first chunk) to last chunk, of every finished response, by status.",
    ["status"],
    buckets=_LATENCY_S,
    registry=REGISTRY,
)


def render() -> bytes:
    """The Prometheus text exposition of every chunkstitch metric."""
    return generate_latest(REGISTRY)
