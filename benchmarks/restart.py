"""The output stall of one worker restart, with and without static group membership.

Each trial, on a fresh embedded broker: three workers in one group, steady paced traffic
(short sequenced streams, ~300 records/s), a consumer that timestamps every response.
After a calm baseline, one worker is SIGKILLed and started again at once (with static
membership: under the same ``CHUNKSTITCH_GROUP_INSTANCE_ID``). Reported per trial:

* the longest gap between two consecutive responses arriving, in the calm baseline and
  in the restart window (from the kill to 25 s later): the output stall;
* p99 (and max) of end-to-response latency (end marker published -> response arrived)
  of the streams that ended in each window;
* whether the group had settled (every partition assigned once) before the kill.

Trials alternate dynamic / static (``--trials`` each, default 3) so that the machine's
load drifts over both alike; the spread over trials is reported. Everything runs on
127.0.0.1; the traffic is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.admin import create_topics
from processor.broker import EmbeddedBroker, free_port
from processor.settings import Settings
from processor.synthetic import text_stream
from topics import RecordMeta, encode_headers

WORKERS = 3
BASELINE_S = 8.0
WINDOW_S = 25.0
STREAMS_PER_S = 25
CHUNKS = 10
CHUNK_GAP_S = 0.08


class Worker:
    def __init__(self, settings: Settings, instance_id: str | None, log: Path) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.settings.to_env(), "CHUNKSTITCH_WEB_PORT": str(self.port)}
        env["CHUNKSTITCH_USAGE_PORT"] = str(free_port())
        if self.instance_id:
            env["CHUNKSTITCH_GROUP_INSTANCE_ID"] = self.instance_id
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "processor", "worker"], env=env, stdout=out, stderr=out
        )

    def readyz(self) -> dict[str, Any] | None:
        raw = b""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:  # 503 while rebalancing: the same body
            raw = exc.read()
        except Exception:
            return None
        with contextlib.suppress(ValueError):
            body: dict[str, Any] = json.loads(raw)
            return body
        return None

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def _settled(workers: list[Worker], partitions: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bodies = [w.readyz() for w in workers]
        if all(b is not None and b.get("ready") for b in bodies):
            flat = sorted(p for b in bodies if b for p in b["partitions"])
            if flat == list(range(partitions)):
                return True
        await asyncio.sleep(0.3)
    return False


async def _traffic(
    settings: Settings, until: float, ended: dict[bytes, float], rng: random.Random
) -> None:
    """Streams of CHUNKS chunks, CHUNK_GAP_S apart, STREAMS_PER_S new ones each second."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=2)
    await producer.start()
    live: list[tuple[bytes, list[dict[str, Any]], int, float]] = []
    n = 0
    next_start = time.monotonic()
    try:
        while time.monotonic() < until:
            now = time.monotonic()
            while next_start <= now:
                cid = f"r-{uuid.uuid4().hex[:10]}-{n}"
                live.append((cid.encode(), text_stream(cid, CHUNKS, rng), 0, now))
                n += 1
                next_start += 1 / STREAMS_PER_S
            keep = []
            for key, chunks, seq, due in live:
                if due > now:
                    keep.append((key, chunks, seq, due))
                    continue
                if seq < len(chunks):
                    meta = RecordMeta(seq=seq, tenant="bench", provider="openai")
                    await producer.send(
                        settings.topic_chunks,
                        json.dumps(chunks[seq]).encode(),
                        key=key,
                        headers=encode_headers(meta),
                    )
                    keep.append((key, chunks, seq + 1, now + CHUNK_GAP_S))
                else:
                    meta = RecordMeta(end_count=len(chunks), end_reason="done")
                    await producer.send(
                        settings.topic_chunks, b"", key=key, headers=encode_headers(meta)
                    )
                    ended[key] = time.monotonic()
            live = keep
            await asyncio.sleep(0.01)
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(settings: Settings, until: float, arrived: dict[bytes, float]) -> None:
    consumer = AIOKafkaConsumer(
        settings.topic_responses,
        bootstrap_servers=settings.broker,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        while time.monotonic() < until:
            batch = await consumer.getmany(timeout_ms=10)
            now = time.monotonic()
            for records in batch.values():
                for rec in records:
                    if rec.key is not None:
                        arrived.setdefault(rec.key, now)
    finally:
        await consumer.stop()


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)]


def _window(
    ended: dict[bytes, float], arrived: dict[bytes, float], start: float, end: float
) -> dict[str, float]:
    times = sorted(t for t in arrived.values() if start <= t <= end)
    gaps = [b - a for a, b in zip([start, *times], [*times, end], strict=True)]
    lat = [arrived[k] - t for k, t in ended.items() if start <= t < end and k in arrived]
    lost = sum(1 for k, t in ended.items() if start <= t < end and k not in arrived)
    return {
        "max_gap_s": max(gaps) if gaps else float("nan"),
        "p99_ms": _p99(lat) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "completions": len(lat),
        "not_arrived": lost,
    }


async def trial(static: bool, workdir: Path, index: int) -> dict[str, Any]:
    with EmbeddedBroker(log_path=workdir / f"tansu-{index}.log") as broker:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            broker=broker.bootstrap,
            app_id=f"bench-restart-{tag}",
            topic_chunks=f"r{tag}.chunks",
            topic_responses=f"r{tag}.responses",
            topic_rollups=f"r{tag}.rollups",
            topic_deadletter=f"r{tag}.deadletter",
            topic_ledger=f"r{tag}.ledger",
            partitions=6,
            data_dir=str(workdir / f"data-{index}"),
        )
        await create_topics(settings)
        kind = "static" if static else "dynamic"
        workers = [
            Worker(settings, f"bench-{tag}-w{i}" if static else None, workdir / f"w{index}-{i}.log")
            for i in range(WORKERS)
        ]
        try:
            for w in workers:
                w.start()
            settled = await _settled(workers, settings.partitions, timeout_s=60)
            ended: dict[bytes, float] = {}
            arrived: dict[bytes, float] = {}
            t0 = time.monotonic()
            kill_at = t0 + BASELINE_S
            stop_at = kill_at + WINDOW_S
            rng = random.Random(index)
            traffic = asyncio.ensure_future(_traffic(settings, stop_at, ended, rng))
            collect = asyncio.ensure_future(_collect(settings, stop_at + 10, arrived))
            await asyncio.sleep(kill_at - time.monotonic())
            victim = workers[1]
            victim.kill9()
            killed = time.monotonic()
            victim.start()  # at once, same instance id when static
            await traffic
            await collect
            base = _window(ended, arrived, t0 + 2, killed)
            restart = _window(ended, arrived, killed, killed + WINDOW_S)
        finally:
            for w in workers:
                w.stop()
    result = {"kind": kind, "settled_before_kill": settled, "baseline": base, "restart": restart}
    print(json.dumps(result), flush=True)
    return result


def _spread(values: list[float], digits: int = 1) -> str:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return "-"
    med, low, high = statistics.median(vals), min(vals), max(vals)
    return f"{med:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks restart", description=__doc__)
    parser.add_argument("--trials", type=int, default=3, help="trials of each kind")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cs-bench-restart-") as tmp:
        for _ in range(args.trials):
            for static in (False, True):
                results.append(asyncio.run(trial(static, Path(tmp), len(results))))
    summarize(results)


def summarize(results: list[dict[str, Any]]) -> None:
    """The table of every kind's trials (also for JSON lines kept from a run)."""
    print()
    header = ("kind", "settled", "base gap s", "restart gap s", "base p99 ms", "restart p99 ms")
    print(
        f"{header[0]:8} {header[1]:>8} {header[2]:>20} {header[3]:>20} {header[4]:>24} "
        f"{header[5]:>26}  not arrived"
    )
    for kind in ("dynamic", "static"):
        rs = [r for r in results if r["kind"] == kind]
        settled = f"{sum(r['settled_before_kill'] for r in rs)}/{len(rs)}"
        print(
            f"{kind:8} {settled:>8} "
            f"{_spread([r['baseline']['max_gap_s'] for r in rs]):>20} "
            f"{_spread([r['restart']['max_gap_s'] for r in rs]):>20} "
            f"{_spread([r['baseline']['p99_ms'] for r in rs], 0):>24} "
            f"{_spread([r['restart']['p99_ms'] for r in rs], 0):>26}  "
            f"{sum(r['restart']['not_arrived'] for r in rs)}"
        )
    print(
        "median (min-max) over trials; gap = longest time between two consecutive responses "
        "arriving; not arrived = streams of the restart window without a response 10 s after it"
    )
