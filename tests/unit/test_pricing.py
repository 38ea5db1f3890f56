"""Estimated cost from the price database (genai-prices): known models priced as their
providers publish, unknown models and providers never guessed, reported cost kept apart."""

from __future__ import annotations

import random

import pytest

from processor.core import assemble_many, contribution, parse_chunk, result
from processor.pricing import PRICE_DATA, costs, estimate
from processor.synthetic import make_stream
from topics import ChatCompletion

JAN_2025_MS = 1_735_732_800_000  # 2025-01-01T12:00Z: prices published long before


def test_known_models_cost_what_their_providers_publish() -> None:
    # gpt-4o-mini: $0.15 / M input, $0.075 / M cached input, $0.60 / M output (OpenAI)
    found = estimate(
        "gpt-4o-mini",
        "openai",
        prompt_tokens=1_000,
        completion_tokens=500,
        cached_prompt_tokens=200,
        at_ms=JAN_2025_MS,
    )
    assert found is not None
    assert found.usd == pytest.approx(800 * 0.15e-6 + 200 * 0.075e-6 + 500 * 0.60e-6)
    assert (found.provider, found.model) == ("openai", "gpt-4o-mini")
    assert found.price_data == PRICE_DATA
    assert PRICE_DATA.startswith("genai-prices ")
    # a dated snapshot name and the provider's own capitalisation resolve to the same model
    dated = estimate(
        "gpt-4o-mini-2024-07-18",
        "OpenAI",
        prompt_tokens=1_000,
        completion_tokens=500,
        cached_prompt_tokens=200,
        at_ms=JAN_2025_MS,
    )
    assert dated is not None
    assert dated.usd == found.usd
    # gpt-4o: $2.50 / M input, $10 / M output
    four_o = estimate(
        "gpt-4o", "openai", prompt_tokens=2_000, completion_tokens=100, at_ms=JAN_2025_MS
    )
    assert four_o is not None
    assert four_o.usd == pytest.approx(2_000 * 2.5e-6 + 100 * 10e-6)


def test_unknown_models_and_providers_get_no_estimate_never_a_guess() -> None:
    kwargs = {"prompt_tokens": 1_000, "completion_tokens": 500, "at_ms": JAN_2025_MS}
    assert estimate("totally-unknown-model-x1", "openai", **kwargs) is None
    assert estimate("totally-unknown-model-x1", None, **kwargs) is None
    # a self-hosted server is not a hosted offer, even for a model name that has one
    assert estimate("meta-llama/Llama-3.3-70B-Instruct", "vllm", **kwargs) is None
    assert estimate("", "openai", **kwargs) is None
    assert (
        estimate("gpt-4o-mini", "openai", prompt_tokens=1, completion_tokens=1, at_ms=None) is None
    )


def _response(kind: str, **meta: object) -> ChatCompletion:
    stream = make_stream(kind, f"p-{kind}", random.Random(3))
    resp = assemble_many(parse_chunk(c) for c in stream.chunks)[0]
    return resp.model_copy(update={"chunkstitch": resp.chunkstitch.model_copy(update=meta)})


def test_reported_cost_wins_and_the_estimate_is_kept_apart_in_the_fold() -> None:
    reported = _response(
        "openrouter-reasoning", provider="openrouter", request_started_at_ms=JAN_2025_MS
    )
    assert costs(reported) == (0.00042, None, None)

    priced = _response("openai-text", provider="openai", request_started_at_ms=JAN_2025_MS)
    assert priced.usage is not None
    cost_reported, cost_estimated, price_data = costs(priced)
    assert cost_reported is None
    assert cost_estimated is not None
    assert cost_estimated > 0
    assert price_data == PRICE_DATA

    meta = priced.chunkstitch.model_copy(
        update={"cost_estimated": cost_estimated, "price_data": price_data}
    )
    key, totals = contribution(priced.model_copy(update={"chunkstitch": meta}))
    assert (totals.cost_nano_usd, totals.with_cost) == (0, 0)
    assert totals.cost_estimated_nano_usd == round(cost_estimated * 1e9)
    assert totals.with_cost_estimated == 1
    assert result(key, totals).cost_estimated_usd == pytest.approx(cost_estimated, rel=1e-6)

    unknown = _response("vllm", provider="vllm", request_started_at_ms=JAN_2025_MS)
    assert costs(unknown) == (None, None, None)
    no_usage = _response("cut-off", provider="openai", request_started_at_ms=JAN_2025_MS)
    assert costs(no_usage) == (None, None, None)


def test_prometheus_counts_reported_and_estimated_cost_apart() -> None:
    from processor import metrics
    from processor.usage._plugin import _observe

    def value(kind: str) -> float:
        got = metrics.REGISTRY.get_sample_value(
            "chunkstitch_cost_usd_total",
            {"tenant": "cost-t", "model": "gpt-4o-mini", "provider": "openai", "kind": kind},
        )
        return got or 0.0

    resp = _response("openai-text", tenant="cost-t", provider="openai", cost_estimated=0.25)
    before = value("estimated"), value("reported")
    _observe(resp, 10_000, set())
    assert value("estimated") - before[0] == pytest.approx(0.25)
    assert value("reported") == before[1]


def test_the_price_data_version_is_exposed() -> None:
    from processor import metrics

    sample = metrics.REGISTRY.get_sample_value(
        "chunkstitch_price_data_info", {"version": PRICE_DATA}
    )
    assert sample == 1


def test_importing_the_price_data_starts_no_thread() -> None:
    """A short-lived command (``chunkstitch usage``) that exits while a daemon thread is
    still inside the price data's validation aborts ("FATAL: exception not rethrown",
    exit -6, about one run in five): only the worker preloads it, in a thread that the
    interpreter waits for (``processor.pricing.preload``)."""
    import subprocess
    import sys

    code = (
        "import threading, processor.pricing; print(sorted(t.name for t in threading.enumerate()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "['MainThread']", out.stdout
