"""The usage fold: contribution / combine / zero / result, property-tested."""

from __future__ import annotations

import random
from functools import reduce

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core import (
    assemble_many,
    combine,
    contribution,
    parse_chunk,
    percentile,
    result,
    roll_up,
    zero,
)
from processor.synthetic import PROVIDERS, make_stream
from topics import LATENCY_BUCKETS_MS, ChatCompletion, UsageTotals

N_BUCKETS = len(LATENCY_BUCKETS_MS) + 1
counts = st.integers(0, 10**12)
totals = st.builds(
    UsageTotals,
    requests=counts,
    complete=counts,
    incomplete=counts,
    error=counts,
    without_usage=counts,
    prompt_tokens=counts,
    completion_tokens=counts,
    total_tokens=counts,
    cached_prompt_tokens=counts,
    reasoning_tokens=counts,
    cost_nano_usd=counts,
    with_cost=counts,
    ttfc_ms_buckets=st.tuples(*[counts] * N_BUCKETS),
    duration_ms_buckets=st.tuples(*[counts] * N_BUCKETS),
    rate_tokens=counts,
    rate_duration_ms=counts,
)


@given(totals, totals, totals)
def test_combine_is_associative(a: UsageTotals, b: UsageTotals, c: UsageTotals) -> None:
    assert combine(combine(a, b), c) == combine(a, combine(b, c))


@given(totals)
def test_zero_is_the_identity(a: UsageTotals) -> None:
    assert combine(zero(), a) == a
    assert combine(a, zero()) == a


@settings(max_examples=50)
@given(st.lists(totals, max_size=8), st.randoms())
def test_result_does_not_depend_on_order(items: list[UsageTotals], rnd: random.Random) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert reduce(combine, items, zero()) == reduce(combine, shuffled, zero())


def _response(kind: str, **meta: object) -> ChatCompletion:
    stream = make_stream(kind, f"u-{kind}", random.Random(3))
    resp = assemble_many(parse_chunk(c) for c in stream.chunks)[0]
    return resp.model_copy(update={"chunkstitch": resp.chunkstitch.model_copy(update=meta)})


def test_contribution_of_a_complete_response() -> None:
    resp = _response(
        "openrouter-reasoning",
        tenant="acme",
        provider="openrouter",
        request_started_at_ms=1_760_000_123_456,
        time_to_first_chunk_ms=180,
        duration_ms=2_000,
    )
    key, t = contribution(resp)
    assert (key.window_start_ms, key.window_ms) == (1_760_000_100_000, 60_000)
    assert (key.tenant, key.provider, key.status) == ("acme", "openrouter", "complete")
    assert (t.requests, t.complete, t.without_usage) == (1, 1, 0)
    assert (t.prompt_tokens, t.completion_tokens, t.total_tokens) == (55, 30, 85)
    assert t.reasoning_tokens == 12
    assert t.cost_nano_usd == 420_000  # 0.00042 USD
    rolled = result(key, t)
    assert rolled.output_tokens_per_s == 15.0
    assert rolled.ttfc_ms_p50 == 250
    assert rolled.cost_usd == 0.00042


def test_no_usage_is_counted_apart_never_guessed() -> None:
    resp = _response("cut-off", tenant="acme", first_chunk_at_ms=5)
    key, t = contribution(resp)
    assert key.status == "incomplete"
    assert (t.without_usage, t.prompt_tokens, t.total_tokens) == (1, 0, 0)


def test_every_provider_shape_contributes() -> None:
    for kind in PROVIDERS:
        key, t = contribution(_response(kind, first_chunk_at_ms=0))
        assert t.requests == 1
        assert key.status in {"complete", "incomplete", "error"}


def test_roll_up_to_hour_and_day() -> None:
    key, _ = contribution(_response("vllm", first_chunk_at_ms=3 * 3_600_000 + 125_000))
    hour = roll_up(key, 3_600_000)
    assert (hour.window_start_ms, hour.window_ms) == (3 * 3_600_000, 3_600_000)
    assert roll_up(hour, 86_400_000).window_start_ms == 0


def test_percentile_reads_bucket_bounds() -> None:
    buckets = tuple([0, 0, 0, 10] + [0] * (N_BUCKETS - 5) + [1])
    assert percentile(buckets, 0.5) == 100
    assert percentile(buckets, 0.99) == LATENCY_BUCKETS_MS[-1]
    assert percentile((0,) * N_BUCKETS, 0.5) is None


def test_rollup_record_key_is_stable() -> None:
    key, _ = contribution(_response("vllm", tenant="t", provider="vllm", first_chunk_at_ms=0))
    assert key.record_key(3) == "0|60000|t|Qwen/Qwen3-8B|vllm|complete|on-time|3"


def test_token_metric_labels_are_capped() -> None:
    from processor import metrics
    from processor.usage import _plugin

    seen: set[tuple[str, str, str]] = set()
    for i in range(5):
        resp = _response("vllm", tenant=f"tenant-{i}", first_chunk_at_ms=0)
        _plugin._observe(resp, 3, seen)
    tenants = {
        sample.labels["tenant"]
        for family in metrics.REGISTRY.collect()
        if family.name == "chunkstitch_tokens"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert {"tenant-0", "tenant-1", "tenant-2", "other"} <= tenants
    assert "tenant-3" not in tenants
    assert "tenant-4" not in tenants
