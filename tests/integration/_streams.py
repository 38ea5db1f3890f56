"""Workloads for worker integration tests: many interleaved sequenced streams."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from processor.core import Assembler, parse_chunk
from processor.synthetic import PROVIDERS, SyntheticStream, make_stream
from tests.helpers.worker import Outgoing
from topics import RecordMeta

KINDS = sorted(k for k in PROVIDERS if k != "cut-off")


def build_streams(n: int, seed: int, prefix: str) -> list[SyntheticStream]:
    rng = random.Random(seed)
    return [make_stream(KINDS[i % len(KINDS)], f"{prefix}-{i}", rng) for i in range(n)]


def wire(
    streams: list[SyntheticStream],
    seed: int,
    *,
    dup_rate: float = 0.1,
    swap_rate: float = 0.1,
    markers: bool = True,
    labels: Callable[[int], tuple[str | None, tuple[tuple[str, str], ...]]] | None = None,
) -> list[Outgoing]:
    """Records for every stream: sequenced chunks, some duplicated, some swapped with their
    neighbour, then an end marker; streams interleaved at random."""
    rng = random.Random(seed)
    per_stream: list[list[Outgoing]] = []
    for n, s in enumerate(streams):
        key = s.completion_id.encode()
        user, attributes = labels(n) if labels else (None, ())
        recs: list[Outgoing] = []
        for seq, chunk in enumerate(s.chunks):
            meta = RecordMeta(
                seq=seq,
                tenant=s.tenant,
                provider=s.provider,
                started_at_ms=1_760_000_000_000,
                user=user,
                attributes=attributes,
            )
            recs.append((key, json.dumps(chunk).encode(), meta))
            if rng.random() < dup_rate:
                recs.append((key, json.dumps(chunk).encode(), meta))
        for i in range(len(recs) - 1):
            if rng.random() < swap_rate:
                recs[i], recs[i + 1] = recs[i + 1], recs[i]
        if markers:
            recs.append((key, b"", RecordMeta(end_count=len(s.chunks), end_reason="done")))
        per_stream.append(recs)
    out: list[Outgoing] = []
    cursors = [0] * len(per_stream)
    live = list(range(len(per_stream)))
    while live:
        i = rng.choice(live)
        out.append(per_stream[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(per_stream[i]):
            live.remove(i)
    return out


def expected(stream: SyntheticStream) -> dict[str, Any]:
    asm = Assembler(stream.completion_id)
    for seq, chunk in enumerate(stream.chunks):
        asm.add(parse_chunk(chunk), seq)
    return comparable(json.loads(asm.finish().to_json()))


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """The parts of a response that depend only on the chunks (not on delivery)."""
    meta = response["chunkstitch"]
    return {
        "id": response["id"],
        "model": response.get("model"),
        "created": response.get("created"),
        "choices": response["choices"],
        "usage": response.get("usage"),
        "error": response.get("error"),
        "status": meta["status"],
        "missing_chunks": meta.get("missing_chunks", 0),
    }
