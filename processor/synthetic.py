"""Deterministic synthetic chunk streams in the shapes real providers send.

Used by the demo, the benchmarks and the tests. Every generator takes a ``random.Random``
(seeded by the caller) and returns the chunks of one completion as dicts, in wire order.
``expected`` metadata travels alongside so tests can check what the worker produced.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PROVIDERS",
    "SyntheticStream",
    "interleave",
    "make_stream",
    "text_stream",
    "tool_stream",
]

_WORDS = (
    "the",
    "stream",
    "processor",
    "joins",
    "every",
    "chunk",
    "of",
    "a",
    "completion",
    "into",
    "one",
    "response",
    "while",
    "operators",
    "watch",
    "tokens",
    "latency",
    "and",
    "cost",
    "per",
    "tenant",
    "model",
    "and",
    "provider",
    "in",
    "real",
    "time",
)


@dataclass
class SyntheticStream:
    """One synthetic completion: its chunks and what assembling them must give."""

    completion_id: str
    provider: str
    tenant: str
    chunks: list[dict[str, Any]]
    expect_status: str = "complete"
    expect_text: dict[int, str] = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> list[str]:
    return [" " + rng.choice(_WORDS) for _ in range(n)]


def _usage(prompt: int, completion: int, camel: bool = False, **extra: Any) -> dict[str, Any]:
    if camel:
        return {
            "promptTokens": prompt,
            "completionTokens": completion,
            "totalTokens": prompt + completion,
            **extra,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **extra,
    }


def text_stream(
    cid: str,
    n_chunks: int,
    rng: random.Random,
    *,
    model: str = "gpt-4o-mini",
    created: int = 1_760_000_000,
) -> list[dict[str, Any]]:
    """An OpenAI-style text stream of ``n_chunks`` chunks (role, words, finish, usage)."""
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_synthetic",
    }
    out = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    ]
    for word in _words(rng, max(n_chunks - 3, 0)):
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": word},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    out.append(
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    )
    out.append({**base, "choices": [], "usage": _usage(rng.randint(10, 900), n_chunks)})
    return out


def tool_stream(cid: str, n_chunks: int, rng: random.Random) -> list[dict[str, Any]]:
    """An OpenAI-style stream with two parallel tool calls whose arguments stream in pieces."""
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": "gpt-4o",
    }
    out: list[dict[str, Any]] = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}
    ]
    for call in (0, 1):
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": call,
                                    "id": f"call_{cid}_{call}",
                                    "type": "function",
                                    "function": {
                                        "name": ("get_weather", "get_time")[call],
                                        "arguments": "",
                                    },
                                }
                            ]
                        },
                    }
                ],
            }
        )
    pieces = max(n_chunks - 5, 2)
    for i in range(pieces):
        call = i % 2
        arg = '{"city": "' if i < 2 else (rng.choice(_WORDS) if i < pieces - 2 else '"}')
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": call, "function": {"arguments": arg}}]},
                    }
                ],
            }
        )
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    out.append({**base, "choices": [], "usage": _usage(120, 40)})
    return out


def _openai_n2(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_100,
        "model": "gpt-4o-mini",
    }
    texts: dict[int, list[str]] = {0: [], 1: []}
    chunks: list[dict[str, Any]] = []
    for i in range(12):
        idx = i % 2
        word = rng.choice(_WORDS) + " "
        texts[idx].append(word)
        d: dict[str, Any] = {"content": word}
        if i < 2:
            d["role"] = "assistant"
        chunks.append({**base, "choices": [{"index": idx, "delta": d}]})
    chunks.append({**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    chunks.append({**base, "choices": [], "usage": _usage(30, 24)})
    return SyntheticStream(
        cid, "openai", "acme", chunks, expect_text={k: "".join(v) for k, v in texts.items()}
    )


def _mistral_camel(cid: str, rng: random.Random) -> SyntheticStream:
    """Mistral via a TypeScript gateway: camelCase, list content with thinking parts,
    tool-call arguments as an object, ``model_length``."""
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_200,
        "model": "magistral-medium-latest",
    }
    words = [rng.choice(_WORDS) for _ in range(6)]
    chunks: list[dict[str, Any]] = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "thinking",
                                "thinking": [{"type": "text", "text": "Planning the answer."}],
                            }
                        ],
                    },
                }
            ],
        },
    ]
    for w in words:
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": [{"type": "text", "text": w + " "}]}}
                ],
            }
        )
    chunks.append(
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "toolCalls": [
                            {
                                "id": "mtool1",
                                "function": {"name": "search", "arguments": {"query": words[0]}},
                                "index": 0,
                            }
                        ]
                    },
                    "finishReason": "model_length",
                }
            ],
            "usage": _usage(40, 20, camel=True),
        }
    )
    return SyntheticStream(
        cid, "mistral", "globex", chunks, expect_text={0: "".join(w + " " for w in words)}
    )


def _openrouter_reasoning(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_300,
        "model": "deepseek/deepseek-r1",
        "provider": "DeepInfra",
    }
    chunks: list[dict[str, Any]] = []
    for piece in ("Think", "ing about", " it."):
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": "",
                            "reasoning": piece,
                            "reasoning_details": [
                                {
                                    "type": "reasoning.text",
                                    "text": piece,
                                    "index": 0,
                                    "format": "unknown",
                                }
                            ],
                        },
                    }
                ],
            }
        )
    words = [rng.choice(_WORDS) + " " for _ in range(5)]
    for w in words:
        chunks.append(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": w}}]}
        )
    chunks.append(
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": "stop",
                    "native_finish_reason": "stop",
                }
            ],
        }
    )
    chunks.append(
        {
            **base,
            "choices": [],
            "usage": _usage(
                55,
                30,
                cost=0.00042,
                is_byok=False,
                completion_tokens_details={"reasoning_tokens": 12},
                prompt_tokens_details={"cached_tokens": 0},
            ),
        }
    )
    return SyntheticStream(cid, "openrouter", "initech", chunks, expect_text={0: "".join(words)})


def _openrouter_error(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_400,
        "model": "anthropic/claude-sonnet-4",
        "provider": "Anthropic",
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": rng.choice(_WORDS)}}
            ],
        }
    ]
    chunks.append(
        {
            **base,
            "error": {"code": 502, "message": "Provider returned error"},
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": ""},
                    "finish_reason": "error",
                    "native_finish_reason": "error",
                }
            ],
        }
    )
    return SyntheticStream(cid, "openrouter", "initech", chunks, expect_status="error")


def _azure(cid: str, rng: random.Random) -> SyntheticStream:
    placeholder = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [
            {
                "prompt_index": 0,
                "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}},
            }
        ],
    }
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_500,
        "model": "gpt-4o-2024-11-20",
        "system_fingerprint": "fp_azure",
    }
    words = [rng.choice(_WORDS) + " " for _ in range(6)]
    chunks: list[dict[str, Any]] = [placeholder]
    chunks.append(
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "content_filter_results": {},
                }
            ],
        }
    )
    for w in words:
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": w},
                        "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}},
                    }
                ],
            }
        )
    chunks.append(
        {
            **base,
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop", "content_filter_results": {}}
            ],
            "usage": _usage(21, 6),
        }
    )
    return SyntheticStream(cid, "azure", "acme", chunks, expect_text={0: "".join(words)})


def _vllm(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_600,
        "model": "Qwen/Qwen3-8B",
    }
    chunks: list[dict[str, Any]] = []
    for piece in ("Let me", " check."):
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"reasoning_content": piece, "reasoning": piece},
                        "logprobs": None,
                        "finish_reason": None,
                        "stop_reason": None,
                    }
                ],
            }
        )
    words = [rng.choice(_WORDS) + " " for _ in range(4)]
    for w in words:
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": w}}]})
    chunks.append(
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None}
            ],
            "usage": _usage(12, 9),
        }
    )
    return SyntheticStream(cid, "vllm", "globex", chunks, expect_text={0: "".join(words)})


def _atoma(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_677_652_288,
        "model": "meta-llama/Llama-3.3-70B-Instruct",
    }
    words = [rng.choice(_WORDS) + " " for _ in range(5)]
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": w, "role": "assistant"}}]}
        for w in words
    ]
    chunks.append(
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "finishReason": "stop"}],
            "usage": {
                "completionTokens": 12,
                "promptTokens": 9,
                "totalTokens": 21,
                "promptTokensDetails": {"audioTokens": 0, "cachedTokens": 10},
            },
        }
    )
    return SyntheticStream(cid, "atoma", "umbrella", chunks, expect_text={0: "".join(words)})


def _openai_audio(cid: str, rng: random.Random) -> SyntheticStream:
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1_760_000_700,
        "model": "gpt-4o-audio-preview",
    }
    pcm = bytes(rng.randrange(256) for _ in range(48))
    chunks = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "audio": {
                            "id": "audio_1",
                            "data": base64.b64encode(pcm[i : i + 16]).decode(),
                            "transcript": ("Hello", " there", "!")[i // 16],
                            "expires_at": 1_760_003_700,
                        },
                    },
                }
            ],
        }
        for i in range(0, 48, 16)
    ]
    chunks.append(
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": _usage(8, 30),
        }
    )
    return SyntheticStream(cid, "openai", "acme", chunks)


def _cut_off(cid: str, rng: random.Random) -> SyntheticStream:
    chunks = text_stream(cid, 8, rng)[:-2]  # no finish_reason, no usage: the upstream died
    return SyntheticStream(cid, "openai", "umbrella", chunks, expect_status="incomplete")


def _openai_text(cid: str, rng: random.Random) -> SyntheticStream:
    chunks = text_stream(cid, rng.randint(8, 30), rng)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return SyntheticStream(
        cid, "openai", rng.choice(["acme", "globex"]), chunks, expect_text={0: text}
    )


def _openai_tools(cid: str, rng: random.Random) -> SyntheticStream:
    return SyntheticStream(cid, "openai", "acme", tool_stream(cid, rng.randint(8, 16), rng))


PROVIDERS: dict[str, Callable[[str, random.Random], SyntheticStream]] = {
    "openai-text": _openai_text,
    "openai-n2": _openai_n2,
    "openai-tools": _openai_tools,
    "openai-audio": _openai_audio,
    "azure": _azure,
    "vllm": _vllm,
    "mistral-camel": _mistral_camel,
    "openrouter-reasoning": _openrouter_reasoning,
    "openrouter-error": _openrouter_error,
    "atoma-camel": _atoma,
    "cut-off": _cut_off,
}
"""Every stream shape, by name."""


def make_stream(kind: str, cid: str, rng: random.Random) -> SyntheticStream:
    """One synthetic stream of the given shape (a key of :data:`PROVIDERS`)."""
    try:
        factory = PROVIDERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown stream kind {kind!r}; choose one of {sorted(PROVIDERS)}"
        ) from None
    return factory(cid, rng)


def interleave(
    streams: list[SyntheticStream], rng: random.Random
) -> list[tuple[SyntheticStream, int, dict[str, Any]]]:
    """Wire order for many concurrent streams: ``(stream, seq, chunk)``, each stream's own
    chunks in order, streams randomly interleaved (as a gateway serving them at once)."""
    cursors = [0] * len(streams)
    live = [i for i, s in enumerate(streams) if s.chunks]
    out: list[tuple[SyntheticStream, int, dict[str, Any]]] = []
    while live:
        pick = rng.choice(live)
        stream = streams[pick]
        seq = cursors[pick]
        out.append((stream, seq, stream.chunks[seq]))
        cursors[pick] += 1
        if cursors[pick] == len(stream.chunks):
            live.remove(pick)
    return out
