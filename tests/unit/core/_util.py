"""Helpers for the core tests: build chunks tersely and assemble them."""

from __future__ import annotations

from typing import Any

from processor.core import Assembler, parse_chunk
from topics import ChatCompletion


def chunk(cid: str = "c1", *choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "choices": list(choices), **top}


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "delta": fields}
    if finish is not None:
        out["finish_reason"] = finish
    return out


def run(*raw: dict[str, Any]) -> ChatCompletion:
    asm = Assembler()
    for item in raw:
        asm.add(parse_chunk(item))
    return asm.finish()


def message(resp: ChatCompletion, index: int = 0) -> dict[str, Any]:
    return next(c for c in resp.choices if c.index == index).message.model_dump(exclude_none=True)
