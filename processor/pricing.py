"""Estimated cost of a completion from a maintained price database (``genai-prices``).

Used by the worker when it builds a response's metadata: where the provider reported no
cost, the estimate is computed from the model, the provider and the token counts, at the
completion's own time (the request start, never the worker's clock: a re-emitted
response gets the same figure). The price data is the snapshot bundled with the installed
``genai-prices`` (no network); its version is kept next to every estimate.

No hand-written prices, and never a guess: a model or provider the database does not know
gets no estimate (``None``). A provider is matched by its id in the database (``openai``,
``azure``, ``anthropic``, ``mistral``, ``openrouter`` ...); a provider it does not list
(a self-hosted vLLM, say) gets no estimate even when the model's name would match a hosted
offer. Without a provider name, the database's own model-name matching decides.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib.metadata import version
from typing import Any

from processor import metrics
from processor.core import event_time_ms
from topics import ChatCompletion

__all__ = ["PRICE_DATA", "Estimate", "costs", "estimate", "preload"]

PRICE_DATA = f"genai-prices {version('genai-prices')}"
"""Which price data the estimates come from (the installed package's bundled snapshot)."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """An estimated cost, and where it came from."""

    usd: float
    price_data: str
    model: str
    """The model as the price database names it."""
    provider: str


@lru_cache(maxsize=4096)
def _lookup(model: str, provider: str | None) -> tuple[Any, Any] | None:
    """(provider, model) in the price database, or None (cached: names repeat)."""
    from genai_prices.data_snapshot import get_snapshot

    try:
        return get_snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None


def estimate(
    model: str | None,
    provider: str | None,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int = 0,
    at_ms: int | None,
) -> Estimate | None:
    """The estimated cost in USD, or ``None`` when the database does not know the model
    (or the provider), or there is no time to price at."""
    if not model or at_ms is None:
        return None
    found = _lookup(model.strip(), provider.strip().lower() if provider else None)
    if found is None:
        return None
    from genai_prices import Usage

    db_provider, db_model = found
    usage = Usage(
        input_tokens=max(prompt_tokens, 0),
        output_tokens=max(completion_tokens, 0),
        cache_read_tokens=min(max(cached_prompt_tokens, 0), max(prompt_tokens, 0)),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            price = db_model.calc_price(
                usage,
                db_provider,
                genai_request_timestamp=datetime.fromtimestamp(at_ms / 1000, UTC),
                auto_update_timestamp=None,
            )
    except (LookupError, ValueError, ArithmeticError):
        return None
    return Estimate(
        usd=float(price.total_price),
        price_data=PRICE_DATA,
        model=str(db_model.id),
        provider=str(db_provider.id),
    )


def costs(response: ChatCompletion) -> tuple[float | None, float | None, str | None]:
    """``(cost_reported, cost_estimated, price_data)`` of a finished response whose
    metadata (tenant, provider, times) is filled in: the provider's own cost when it
    reported one (``usage.cost``, e.g. OpenRouter), else an estimate when the database
    knows the model, else neither."""
    usage = response.usage
    if usage is None or not response.chunkstitch.usage_reported:
        return None, None, None
    reported = usage.model_dump().get("cost")
    if isinstance(reported, int | float) and not isinstance(reported, bool):
        return float(reported), None, None
    cached = (usage.prompt_tokens_details or {}).get("cached_tokens")
    found = estimate(
        response.model,
        response.chunkstitch.provider or response.provider,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=cached if isinstance(cached, int) else 0,
        at_ms=event_time_ms(response),
    )
    if found is None:
        return None, None, None
    return None, found.usd, found.price_data


def _load() -> None:
    _lookup("gpt-4o-mini", "openai")


def preload() -> None:
    """Load the price data in the background (it takes about a second to import), so the
    worker's first completion does not wait for it. Called by the worker at start-up,
    never at import: a command that only needs ``PRICE_DATA`` starts no thread. Not a
    daemon thread: one still inside the price data's (Rust) validation when a short-lived
    process exits aborts the interpreter ("FATAL: exception not rethrown")."""
    threading.Thread(target=_load, name="chunkstitch-price-data").start()


metrics.PRICE_DATA.labels(PRICE_DATA).set(1)
