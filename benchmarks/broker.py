"""The embedded broker alone: produce-to-consume latency as its memory store grows.

No chunkstitch code runs: one aiokafka producer publishes 350-byte records at a steady
rate for a bounded time, one consumer (fetch wait 10 ms, as the worker's) reads them,
and the latency from ``send`` to arrival is reported per 5-second window. On this
broker it climbs with the records held (it never deletes any), which is why every
latency trial of ``benchmarks e2e`` starts a fresh broker.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.broker import EmbeddedBroker

WINDOW_S = 5


async def run(bootstrap: str, rate: float, seconds: float) -> dict[int, list[float]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("bench-broker", 4, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        "bench-broker",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    total = int(rate * seconds)
    start_wall = time.time()
    by_window: dict[int, list[float]] = defaultdict(list)

    async def read() -> None:
        got = 0
        while got < total:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for r in records:
                    got += 1
                    sent = float(r.value[:20])
                    by_window[int((sent - start_wall) // WINDOW_S)].append(now - sent)

    reader = asyncio.create_task(read())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    pad = b"x" * 330
    start = time.monotonic()
    try:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send("bench-broker", b"%20.6f" % time.time() + pad, key=b"%d" % i)
            if i and i % int(rate * WINDOW_S) == 0:
                print(f"  {i:,} of {total:,} records sent", flush=True)
        await producer.flush()
        await asyncio.wait_for(reader, timeout=60)
    finally:
        await producer.stop()
        await consumer.stop()
    return by_window


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks broker", description=__doc__)
    parser.add_argument("--rate", type=float, default=1400, help="records per second")
    parser.add_argument("--seconds", type=float, default=30, help="how long to publish")
    args = parser.parse_args(argv)
    print(f"embedded broker alone: {args.rate:,.0f} records/s for {args.seconds:.0f} s")
    with EmbeddedBroker() as broker:
        windows = asyncio.run(run(broker.bootstrap, args.rate, args.seconds))
    for w in sorted(windows):
        lat = sorted(windows[w])
        p99 = lat[min(int(len(lat) * 0.99), len(lat) - 1)]
        print(
            f"  {w * WINDOW_S:3d}-{(w + 1) * WINDOW_S:3d} s: p50 "
            f"{statistics.median(lat) * 1000:6.1f} ms, p99 {p99 * 1000:6.1f} ms"
        )
