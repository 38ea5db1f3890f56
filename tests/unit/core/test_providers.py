"""Every provider shape assembles as expected, and complete ones validate as OpenAI's type."""

from __future__ import annotations

import json
import random

import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion

from processor.core import assemble_many, parse_chunk
from processor.synthetic import PROVIDERS, make_stream


@pytest.mark.parametrize("kind", sorted(PROVIDERS))
def test_provider_stream_assembles(kind: str) -> None:
    stream = make_stream(kind, f"cmpl-{kind}", random.Random(7))
    responses = assemble_many(parse_chunk(c) for c in stream.chunks)
    assert len(responses) == 1
    resp = responses[0]
    assert resp.id == stream.completion_id
    assert resp.chunkstitch.status == stream.expect_status
    for index, text in stream.expect_text.items():
        choice = next(c for c in resp.choices if c.index == index)
        assert choice.message.content == text
    if stream.expect_status == "complete" and kind != "mistral-camel":
        OpenAIChatCompletion.model_validate(json.loads(resp.to_json()))


def test_mistral_camel_details() -> None:
    resp = assemble_many(
        parse_chunk(c) for c in make_stream("mistral-camel", "m", random.Random(1)).chunks
    )[0]
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.raw_finish_reason == "model_length"
    assert choice.message.reasoning == "Planning the answer."
    calls = choice.message.tool_calls or []
    assert json.loads(calls[0].function.arguments) == {
        "query": json.loads(calls[0].function.arguments)["query"]
    }
    assert resp.usage is not None
    assert resp.usage.total_tokens == 60


def test_openrouter_reasoning_and_cost_kept() -> None:
    resp = assemble_many(
        parse_chunk(c) for c in make_stream("openrouter-reasoning", "r", random.Random(1)).chunks
    )[0]
    msg = resp.choices[0].message
    assert msg.reasoning == "Thinking about it."
    assert msg.reasoning_details == [
        {"type": "reasoning.text", "text": "Thinking about it.", "index": 0, "format": "unknown"}
    ]
    assert resp.usage is not None
    assert resp.usage.model_dump()["cost"] == 0.00042
    assert resp.provider == "DeepInfra"


def test_atoma_camel_usage_details() -> None:
    resp = assemble_many(
        parse_chunk(c) for c in make_stream("atoma-camel", "a", random.Random(1)).chunks
    )[0]
    assert resp.usage is not None
    assert resp.usage.prompt_tokens_details == {"audio_tokens": 0, "cached_tokens": 10}
    assert resp.choices[0].finish_reason == "stop"


def test_seed_example_values_from_provider_pages() -> None:
    """OpenRouter's generated example has float index/created; Mistral's a huge index."""
    chunk = parse_chunk(
        {
            "id": "<id>",
            "choices": [{"delta": {}, "finishReason": "length", "index": 7881.03}],
            "created": 6771.54,
            "model": "PT Cruiser",
            "object": "chat.completion.chunk",
        }
    )
    resp = assemble_many([chunk])[0]
    assert resp.choices[0].index == 7881
    assert resp.created == 6771
    mistral = parse_chunk(
        {
            "id": "<id>",
            "model": "PT Cruiser",
            "usage": {"promptTokens": 16, "completionTokens": 34, "totalTokens": 50},
            "choices": [{"index": 618809, "delta": {}, "finishReason": "error"}],
        }
    )
    resp = assemble_many([mistral])[0]
    assert resp.choices[0].index == 618809
    assert resp.chunkstitch.status == "error"
