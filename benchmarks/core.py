"""Assembler speed: chunkstitch's validated merge vs a json.loads floor and openai-python.

Streams: a 500-chunk text stream and a 200-chunk tool-call stream (OpenAI shape). For each:
  floor     json.loads + string concatenation of the same chunks (no validation, no rules);
  chunkstitch  parse_chunk (pydantic validation) + Assembler.add + finish();
  openai    openai-python's ChatCompletionStreamState.handle_chunk + get_final_completion,
            with chunks built the way the SDK builds them (construct_type after json.loads).
Targets (issue 4): chunkstitch >= 0.5x floor, >= 3x openai-python.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from processor.core import Assembler, parse_chunk
from processor.synthetic import text_stream, tool_stream


def _floor(raws: list[bytes]) -> None:
    text = ""
    args = ""
    for raw in raws:
        data = json.loads(raw)
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                args += (call.get("function") or {}).get("arguments") or ""


def _chunkstitch(raws: list[bytes]) -> None:
    asm = Assembler()
    for raw in raws:
        asm.add(parse_chunk(raw), size=len(raw))
    asm.finish()


def _openai(raws: list[bytes]) -> None:
    from openai._models import construct_type
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state: ChatCompletionStreamState[object] = ChatCompletionStreamState()
    for raw in raws:
        chunk = construct_type(type_=ChatCompletionChunk, value=json.loads(raw))
        state.handle_chunk(chunk)  # type: ignore[arg-type]
    state.get_final_completion()


def _round(fn: Callable[[list[bytes]], None], raws: list[bytes], seconds: float) -> float:
    """chunks/second of ``fn`` over ``raws``, repeated for about ``seconds`` (bounded)."""
    n = 0
    start = time.perf_counter()
    while True:
        fn(raws)
        n += 1
        now = time.perf_counter()
        if now - start >= seconds or n >= 10_000:
            return n * len(raws) / (now - start)


IMPLS: dict[str, Callable[[list[bytes]], None]] = {
    "floor": _floor,
    "chunkstitch": _chunkstitch,
    "openai": _openai,
}


def measure(raws: list[bytes], seconds: float, rounds: int = 5) -> dict[str, float]:
    """Best rate per implementation; rounds interleave the implementations so that a noisy
    neighbour slows all of them alike."""
    best = dict.fromkeys(IMPLS, 0.0)
    for _ in range(rounds):
        for label, fn in IMPLS.items():
            best[label] = max(best[label], _round(fn, raws, seconds / rounds))
    return best


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks core", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args(argv)
    rng = random.Random(42)
    cases = {
        "text, 500 chunks": [json.dumps(c).encode() for c in text_stream("bench-t", 500, rng)],
        "tool calls, 200 chunks": [
            json.dumps(c).encode() for c in tool_stream("bench-c", 200, rng)
        ],
    }
    header = ("stream", "floor c/s", "chunkstitch", "openai", "vs floor", "vs openai")
    print(
        f"{header[0]:<24}{header[1]:>12}{header[2]:>13}{header[3]:>11}{header[4]:>10}{header[5]:>11}"
    )
    for name, raws in cases.items():
        print(f"  measuring {name} ({args.seconds:.0f}s per implementation) ...", flush=True)
        results = measure(raws, args.seconds)
        print(
            f"{name:<24}{results['floor']:>12,.0f}{results['chunkstitch']:>13,.0f}"
            f"{results['openai']:>11,.0f}{results['chunkstitch'] / results['floor']:>9.2f}x"
            f"{results['chunkstitch'] / results['openai']:>10.1f}x"
        )
