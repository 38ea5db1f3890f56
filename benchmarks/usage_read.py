"""Does reading usage slow stitching? (``./dev bench usage_read``)

One worker on a fresh embedded broker, with usage history (tiny completions over 30
simulated days). Paced stitching load (20-chunk streams, end marker to response latency
measured as in ``./dev bench e2e``), in alternating trials: quiet, then with bursts of
200 concurrent ``GET /usage`` requests every second (a separate load process, so the
measuring process is not slowed by it), repeated. The broker slows as its store grows,
so the trials alternate and the ratio is taken between neighbours.

Target (issue 13): the loaded p99 at most 1.10 x the quiet p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from benchmarks.e2e import (
    _http_ready,
    _percentiles,
    _records,
    _settings,
    _stop,
    _wait_ready,
    _worker,
)
from benchmarks.soak import _publish
from benchmarks.soak import _records as _history
from processor.admin import create_topics
from processor.broker import EmbeddedBroker, free_port
from processor.settings import Settings

LOAD = """
import asyncio, sys, time
import aiohttp
async def main(port, burst, seconds):
    paths = ["/usage?window=1d&by=tenant", "/usage?window=1h&by=tenant,model&limit=200",
             "/usage?window=1m&by=tenant&since=3h&limit=100"]
    done = failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=burst)) as s:
        async def one(i):
            nonlocal done, failed
            try:
                async with s.get(f"http://127.0.0.1:{port}{paths[i % 3]}") as r:
                    await r.read()
                    done += r.status == 200
                    failed += r.status != 200
            except Exception:
                failed += 1
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(burst)))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
    print(done, failed, flush=True)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
"""


async def _paced_latency(
    settings: Settings, rate: float, seconds: float, *, markers_out: bool, seed: int
) -> list[float]:
    """As ``./dev bench e2e`` measures it (end marker sent -> response arrived), but the
    reader starts at the end of the responses topic, after the history."""
    del markers_out
    n_streams = max(int(rate * seconds / 21), 10)
    records: list[Any] = _records(n_streams, 20, seed=seed)
    sent_at: dict[bytes, float] = {}
    arrived_at: dict[bytes, float] = {}
    c = AIOKafkaConsumer(
        settings.topic_responses,
        bootstrap_servers=settings.broker,
        auto_offset_reset="latest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await c.start()
    await c.seek_to_end()
    keys = {k for k, v, _ in records if not v}

    async def reader() -> None:
        while len(arrived_at) < len(keys):
            batch = await c.getmany(timeout_ms=100)
            now = time.time()
            for recs in batch.values():
                for r in recs:
                    if r.key in keys:
                        arrived_at.setdefault(r.key, now)

    task = asyncio.create_task(reader())
    p = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=1)
    await p.start()
    start = time.monotonic()
    for i, (k, v, h) in enumerate(records):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if not v:
            sent_at[k] = time.time()
        await p.send(settings.topic_chunks, v, key=k, headers=h)
    await p.stop()
    try:
        await asyncio.wait_for(task, timeout=60)
    finally:
        await c.stop()
    return [max(arrived_at[k] - sent_at[k], 0.0) for k in sent_at if k in arrived_at]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks usage_read")
    parser.add_argument("--rate", type=float, default=600.0, help="stitching records/s")
    parser.add_argument("--seconds", type=float, default=8.0, help="per trial")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--history", type=int, default=20_000, help="completions of history")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cs-usage-read-") as tmp_s:
        tmp = Path(tmp_s)
        with EmbeddedBroker() as broker:
            settings = _settings(broker.bootstrap, tmp, web_port=free_port())
            asyncio.run(create_topics(settings))
            proc = _worker(settings, tmp / "worker.log")
            try:
                _wait_ready(_http_ready(settings.web_port), proc)
                asyncio.run(
                    _publish(
                        broker.bootstrap,
                        settings.topic_chunks,
                        _history(0, args.history, args.history),
                    )
                )
                asyncio.run(asyncio.sleep(10))  # history stitched, folded and in the view
                rows = []
                for pair in range(args.pairs):
                    quiet = _percentiles(
                        asyncio.run(
                            _paced_latency(
                                settings, args.rate, args.seconds, markers_out=False, seed=pair
                            )
                        )
                    )
                    load = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            LOAD,
                            str(settings.usage_port),
                            str(args.burst),
                            str(args.seconds + 2),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    loaded = _percentiles(
                        asyncio.run(
                            _paced_latency(
                                settings,
                                args.rate,
                                args.seconds,
                                markers_out=False,
                                seed=100 + pair,
                            )
                        )
                    )
                    out, _ = load.communicate(timeout=60)
                    ok, failed = (int(x) for x in out.split())
                    rows.append((quiet, loaded, ok, failed))
                    print(
                        f"pair {pair + 1}: quiet p50 {quiet['p50_ms']:.1f} p99 "
                        f"{quiet['p99_ms']:.1f} ms | with {args.burst} concurrent /usage per "
                        f"second ({ok} answered, {failed} failed): p50 {loaded['p50_ms']:.1f} "
                        f"p99 {loaded['p99_ms']:.1f} ms | p99 ratio "
                        f"{loaded['p99_ms'] / quiet['p99_ms']:.2f}",
                        flush=True,
                    )
            finally:
                _stop(proc)
    ratio = statistics.median(loaded["p99_ms"] / quiet["p99_ms"] for quiet, loaded, _, _ in rows)
    print(f"median p99 ratio loaded/quiet: {ratio:.2f} (target <= 1.10)")
