"""Peak memory of a stitcher's ledger load on assignment.

Writes ``--entries`` ledger records (33-character ids, within the last hour) over
``--partitions`` partitions of a fresh embedded broker on 127.0.0.1, then loads them
into a :class:`~processor.worker._stitcher.Stitcher` (``preload``, as on an assignment)
in a fresh subprocess per ``--runs`` and reports that process's peak RSS, the load's
time and, with ``--trace``, the tracemalloc peak next to the folded state left after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from aiokafka import AIOKafkaProducer

from processor.admin import create_topics
from processor.broker import EmbeddedBroker
from processor.settings import Settings

TOPIC = "bench-ledger"


def _settings(broker: str, partitions: int) -> Settings:
    return Settings(
        broker=broker,
        topic_ledger=TOPIC,
        topic_chunks=f"{TOPIC}.chunks",
        topic_responses=f"{TOPIC}.responses",
        topic_rollups=f"{TOPIC}.rollups",
        topic_deadletter=f"{TOPIC}.deadletter",
        partitions=partitions,
        emitted_memory_s=3600,
    )


async def write(broker: str, entries: int, partitions: int) -> None:
    await create_topics(_settings(broker, partitions))
    producer = AIOKafkaProducer(
        bootstrap_servers=broker, acks="all", linger_ms=50, max_batch_size=1 << 20
    )
    await producer.start()
    now_ms = int(time.time() * 1000)
    try:
        futures = []
        for i in range(entries):
            futures.append(
                await producer.send(
                    TOPIC,
                    str(i * 7).encode(),
                    key=f"chatcmpl-{i:024d}".encode(),
                    partition=i % partitions,
                    timestamp_ms=now_ms - (entries - i) * 3_000_000 // entries,
                )
            )
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures = []
                print(f"  written {i + 1:,} of {entries:,}", file=sys.stderr, flush=True)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def load(broker: str, partitions: int, trace: bool) -> dict[str, Any]:
    from processor.worker._stitcher import Stitcher

    async def send(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a ledger load sends nothing")

    stitcher = Stitcher(_settings(broker, partitions), send, time.monotonic)
    if trace:
        tracemalloc.start()
    started = time.monotonic()
    await stitcher.preload(list(range(partitions)))
    out: dict[str, Any] = {
        "entries": sum(len(p.ledger) for p in stitcher.parts.values()),
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        out["traced_peak_mb"] = round(peak / 2**20)
        out["traced_after_mb"] = round(current / 2**20)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks ledger_load", description=__doc__)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="also trace (slower)")
    parser.add_argument("--load-from", help=argparse.SUPPRESS)  # the subprocess's own
    args = parser.parse_args(argv)
    if args.load_from:
        print(json.dumps(asyncio.run(load(args.load_from, args.partitions, args.trace))))
        return
    with EmbeddedBroker() as broker:
        print(f"writing {args.entries:,} ledger entries", file=sys.stderr, flush=True)
        asyncio.run(write(broker.bootstrap, args.entries, args.partitions))
        for run in range(args.runs):
            cmd = [sys.executable, "-m", "benchmarks", "ledger_load", "--load-from"]
            cmd += [broker.bootstrap, "--partitions", str(args.partitions)]
            cmd += ["--trace"] if args.trace else []
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
            print(f"run {run + 1}: {done.stdout.strip().splitlines()[-1]}", flush=True)
