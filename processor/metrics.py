"""Prometheus metrics of the worker (``GET /metrics`` on its web port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

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
    "Records whose chunkstitch header was ignored as implausible, by header "
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
    "label combinations beyond CHUNKSTITCH_METRICS_LABEL_CAP are counted as 'other'.",
    ["tenant", "model", "provider", "kind"],
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
    "Request start to first chunk, of finished responses (when the publisher sent the start).",
    buckets=_LATENCY_S,
    registry=REGISTRY,
)
DURATION = Histogram(
    "chunkstitch_completion_duration_seconds",
    "Request start (or first chunk) to last chunk, of finished responses.",
    buckets=_LATENCY_S,
    registry=REGISTRY,
)


def render() -> bytes:
    """The Prometheus text exposition of every chunkstitch metric."""
    return generate_latest(REGISTRY)
