"""End to end on the embedded broker: what the worker costs next to its own floors and peers.

Measured in one run, each on a fresh embedded broker (Tansu keeps every record in memory)
preloaded with the same chunk records:

  (a) raw aiokafka consume-and-produce passthrough: the floor of any Python pipeline here;
  (b) a plain faust agent forwarding every record unchanged: what faust costs by itself;
  (q) a Quix Streams application (confluent-kafka / librdkafka) forwarding every record
      unchanged: the closest peer framework;
  (c) the chunkstitch worker: full assembly, held acks, ledger, emission, usage rollups
      (and (c') without usage rollups).

The variants run in interleaved rounds (a, b, q, c, c' per round, ``--rounds`` of them), so
that the machine's drift hits every variant alike; medians and the spread (min to max) are
reported, and the ratios c/a, c/b and c/q per round. The passthroughs forward key, value
and headers unchanged (the worker reads the headers). Each variant is a separate process;
throughput = records / (time from the process being ready to its last output); the time
from ready to the first output is shown beside it (start-up work after "ready"). CPU per
record = the process's CPU time (user + system, all threads, from /proc) over that window
divided by the records, and the broker's CPU over the same window beside it (it also serves
the benchmark's own reader of the output topic).

Then, for (c): latency from a stream's end marker being published to its response
arriving at half of (c)'s median peak (p50/p99) next to the same load through a bare
consume-and-produce hop, worker memory with 10,000 streams in flight, and chunks/s at 20,
500 and 5,000 chunks per stream.

``--backlog 5000``: instead, a worker draining a preloaded backlog of 105,000 records with a
2 s idle timeout; passes when every stream is complete and there is no dead letter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.admin import create_topics
from processor.broker import EmbeddedBroker, free_port
from processor.settings import Settings
from processor.synthetic import text_stream
from topics import RecordMeta, encode_headers

FAUST_PASSTHROUGH = """
import faust, sys
app = faust.App("bench-pass", broker="kafka://" + sys.argv[1], value_serializer="raw",
                key_serializer="raw", web_port=int(sys.argv[4]), broker_session_timeout=3,
                topic_partitions=4, consumer_auto_offset_reset="earliest")
src = app.topic(sys.argv[2], value_type=bytes, key_type=bytes, internal=False)
dst = app.topic(sys.argv[3], value_type=bytes, key_type=bytes, internal=False)

@app.agent(src)
async def forward(stream):
    async for event in stream.events():
        await dst.send(key=event.key, value=event.value, headers=event.message.headers)

@app.page("/readyz")
async def ready(web, request):
    return web.json({"ready": bool(app.consumer.assignment())})

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--web-port", sys.argv[4]]
    app.main()
"""

AIOKAFKA_PASSTHROUGH = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
class Ready(ConsumerRebalanceListener):  # ready once partitions are assigned, as the others
    async def on_partitions_revoked(self, revoked):
        pass
    async def on_partitions_assigned(self, assigned):
        if assigned:
            print("ready", flush=True)
async def main():
    c = AIOKafkaConsumer(bootstrap_servers=sys.argv[1], group_id="bench-raw",
                         auto_offset_reset="earliest", session_timeout_ms=3000,
                         heartbeat_interval_ms=500)
    c.subscribe([sys.argv[2]], listener=Ready())
    p = AIOKafkaProducer(bootstrap_servers=sys.argv[1], acks="all", linger_ms=5)
    await c.start(); await p.start()
    while True:
        batch = await c.getmany(timeout_ms=200, max_records=1000)
        recs = [r for part in batch.values() for r in part]
        futs = [await p.send(sys.argv[3], r.value, key=r.key, headers=list(r.headers))
                for r in recs]
        if futs:
            await asyncio.gather(*futs)
            await c.commit()
asyncio.run(main())
"""

QUIX_PASSTHROUGH = """
import sys
from quixstreams import Application

class App(Application):
    # The only hook for "partitions assigned" (private in Quix Streams 3.x): say ready there.
    def _on_assign(self, consumer, partitions):
        super()._on_assign(consumer, partitions)
        if partitions:
            print("ready", flush=True)

app = App(broker_address=sys.argv[1], consumer_group="bench-quix", auto_offset_reset="earliest",
          loglevel="WARNING", use_changelog_topics=False, auto_create_topics=False,
          processing_guarantee="at-least-once",
          consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
src = app.topic(sys.argv[2], key_deserializer="bytes", value_deserializer="bytes")
dst = app.topic(sys.argv[3], key_serializer="bytes", value_serializer="bytes")
app.dataframe(src).to_topic(dst)
app.run()
"""
"""Quix Streams with its defaults (at-least-once, commit every 5 s, librdkafka's producer
and fetch settings) except: read from the earliest offset, no changelog topics (no state
is used), topics not auto-created (they exist)."""


def _settings(broker: str, tmp: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "broker": broker,
        "app_id": f"bench-{random.randrange(1 << 30)}",
        "partitions": 4,
        "session_timeout_s": 3,
        "heartbeat_interval_s": 0.5,
        "idle_timeout_s": 10,
        "data_dir": str(tmp / "data"),
        "log_level": "WARNING",
        "usage_port": free_port(),
    }
    values.update(extra)
    return Settings(**values)


def _records(
    streams: int, chunks: int, seed: int
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Sequenced text streams with end markers, about 50 streams live at a time."""
    rng = random.Random(seed)
    per = []
    for i in range(streams):
        cid = f"bench-{seed}-{i}"
        recs = [
            (cid.encode(), json.dumps(c).encode(), encode_headers(RecordMeta(seq=n, tenant="t")))
            for n, c in enumerate(text_stream(cid, chunks, rng))
        ]
        recs.append(
            (cid.encode(), b"", encode_headers(RecordMeta(end_count=len(recs), end_reason="done")))
        )
        per.append(recs)
    out = []
    live: list[int] = []
    cursors = [0] * streams
    nxt = 0
    while live or nxt < streams:
        while len(live) < 50 and nxt < streams:
            live.append(nxt)
            nxt += 1
        i = rng.choice(live)
        out.append(per[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(per[i]):
            live.remove(i)
    return out


HOP_FLOOR = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
async def main():
    c = AIOKafkaConsumer(sys.argv[2], bootstrap_servers=sys.argv[1], group_id="bench-hop",
                         auto_offset_reset="earliest", session_timeout_ms=3000,
                         heartbeat_interval_ms=500, fetch_max_wait_ms=10)
    p = AIOKafkaProducer(bootstrap_servers=sys.argv[1], acks="all", linger_ms=0)
    await c.start(); await p.start()
    said = False
    while True:
        batch = await c.getmany(timeout_ms=100)
        if not said and c.assignment():
            print("assigned", flush=True)
            said = True
        for part in batch.values():
            for r in part:
                await p.send(sys.argv[3], r.value, key=r.key)
asyncio.run(main())
"""
"""The least a consume-and-produce hop can do: forward each record as it is fetched, never
wait for an acknowledgement, let the consumer commit in the background. The latency floor
of any pipeline that reads one topic and writes another on this broker."""


async def _preload(broker: str, topic: str, records: list[Any]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=20)
    await p.start()
    try:
        futs = [await p.send(topic, v, key=k, headers=h) for k, v, h in records]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def _count_until(broker: str, topic: str, n: int, timeout_s: float) -> tuple[float, float]:
    """Wait until ``n`` records are on ``topic``; the monotonic times the first and the last
    were seen. The reader asks every 10 ms: the embedded broker holds a fetch at the end of
    a partition for its whole wait, which would round the end time up by that much."""
    c = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await c.start()
    seen = 0
    first = last = time.monotonic()
    deadline = last + timeout_s
    try:
        while seen < n and time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=100, max_records=5000)
            got = sum(len(r) for r in batch.values())
            if got:
                if not seen:
                    first = time.monotonic()
                seen += got
                last = time.monotonic()
    finally:
        await c.stop()
    if seen < n:
        raise TimeoutError(f"only {seen} of {n} records reached {topic} within {timeout_s}s")
    return first, last


def _wait_ready(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 60
) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"benchmark process exited with {proc.returncode}")
        if check():
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("benchmark process not ready")


def _http_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return bool(json.loads(r.read()).get("ready"))
        except Exception:
            return False

    return check


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _worker(
    settings: Settings, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), **(extra_env or {})}
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "processor", "worker"], env=env, stdout=out, stderr=out
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


VARIANTS: dict[str, str] = {
    "aiokafka": "(a) aiokafka passthrough",
    "faust": "(b) faust forward",
    "quix": "(q) Quix Streams forward",
    "worker": "(c) chunkstitch worker",
    "worker-no-usage": "(c') worker, no usage rollups",
}


def _start_script(
    script: str, args: list[str], tmp: Path, name: str, *, stdout: Any
) -> subprocess.Popen[bytes]:
    path = tmp / f"bench_{name}.py"  # never the name of a module it imports
    path.write_text(script)
    err = (tmp / f"bench_{name}.err").open("wb")
    return subprocess.Popen([sys.executable, str(path), *args], stdout=stdout, stderr=err, cwd=tmp)


def _wait_line(proc: subprocess.Popen[bytes], line: bytes, timeout_s: float = 60) -> float:
    """Wait for ``line`` on the process's stdout; the monotonic time it came."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return time.monotonic()
        if not got and proc.poll() is not None:
            raise RuntimeError(f"benchmark process exited with {proc.returncode}")
    raise TimeoutError(f"benchmark process did not say {line!r} within {timeout_s}s")


def run_variant(variant: str, streams: int, chunks: int, tmp: Path) -> dict[str, float]:
    """Throughput and CPU of one variant on a fresh broker preloaded with the same workload.
    ``worker`` runs with usage rollups, ``worker-no-usage`` without."""
    records = _records(streams, chunks, seed=1)
    with EmbeddedBroker() as broker:
        settings = _settings(
            broker.bootstrap, tmp, web_port=free_port(), usage_enabled=variant != "worker-no-usage"
        )
        asyncio.run(create_topics(settings))
        asyncio.run(_preload(broker.bootstrap, settings.topic_chunks, records))
        out_topic = settings.topic_responses
        expected = streams if variant.startswith("worker") else len(records)
        args = [broker.bootstrap, settings.topic_chunks, out_topic]
        if variant == "aiokafka":
            proc = _start_script(AIOKAFKA_PASSTHROUGH, args, tmp, variant, stdout=subprocess.PIPE)
            t0 = _wait_line(proc, b"ready")
        elif variant == "quix":
            proc = _start_script(QUIX_PASSTHROUGH, args, tmp, variant, stdout=subprocess.PIPE)
            t0 = _wait_line(proc, b"ready")
        elif variant == "faust":
            port = free_port()
            proc = _start_script(
                FAUST_PASSTHROUGH, [*args, str(port)], tmp, variant, stdout=subprocess.DEVNULL
            )
            t0 = _wait_ready(_http_ready(port), proc)
        else:
            proc = _worker(settings, tmp / "worker.log")
            t0 = _wait_ready(_http_ready(settings.web_port), proc)
        broker_pid = broker._proc.pid  # type: ignore[union-attr]
        cpu0, broker0 = _cpu_s(proc.pid), _cpu_s(broker_pid)
        try:
            first, t1 = asyncio.run(
                _count_until(broker.bootstrap, out_topic, expected, timeout_s=600)
            )
            cpu1, broker1 = _cpu_s(proc.pid), _cpu_s(broker_pid)
            rss = _rss_mb(proc.pid)
        finally:
            _stop(proc)
    n = len(records)
    return {
        "records": n,
        "seconds": t1 - t0,
        "rate": n / (t1 - t0),
        "first_s": first - t0,
        "cpu_us": (cpu1 - cpu0) / n * 1e6,
        "broker_cpu_us": (broker1 - broker0) / n * 1e6,
        "rss_mb": rss,
    }


async def _paced_latency(
    settings: Settings, rate: float, seconds: float, *, markers_out: bool, seed: int = 3
) -> list[tuple[str, float, float, float]]:
    """Publish 20-chunk streams with end markers at ``rate`` records/s for ``seconds``;
    per stream, the seconds from its end marker's publish (the ``send`` call, as a gateway
    makes it) to the first record under its key arriving on the responses topic at a consumer
    (which asks the broker every 10 ms, as the worker does). ``markers_out``: the output
    carries the end markers themselves (a passthrough), not responses.

    Per stream ``(key, published, produced, arrived)``, wall-clock seconds: ``produced`` is the
    output record's CreateTime (ms), which the producer of the hop (the worker, or the hop
    floor's forwarder) stamps when it hands the record to its producer, so the latency
    splits into the hop's input side and its output side."""
    n_streams = max(int(rate * seconds / 21), 10)
    records = _records(n_streams, 20, seed=seed)
    broker, topic_in, topic_out = settings.broker, settings.topic_chunks, settings.topic_responses
    sent_at: dict[bytes, float] = {}
    arrived_at: dict[bytes, tuple[float, float]] = {}
    c = AIOKafkaConsumer(
        topic_out,
        bootstrap_servers=broker,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await c.start()

    async def reader() -> None:
        while len(arrived_at) < n_streams:
            batch = await c.getmany(timeout_ms=100)
            now = time.time()
            for recs in batch.values():
                for r in recs:
                    if r.key is not None and (not markers_out or not r.value):
                        arrived_at.setdefault(r.key, (now, r.timestamp / 1000))

    task = asyncio.create_task(reader())
    p = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=1)
    await p.start()
    start = time.monotonic()
    for i, (k, v, h) in enumerate(records):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if not v:
            sent_at[k] = time.time()
        await p.send(topic_in, v, key=k, headers=h)
    await p.stop()
    try:
        await asyncio.wait_for(task, timeout=60)
    finally:
        await c.stop()
    return [
        (k.decode(), sent_at[k], arrived_at[k][1], arrived_at[k][0])
        for k in sent_at
        if k in arrived_at
    ]


def _split(stamps: list[tuple[str, float, float, float]]) -> dict[str, float]:
    """p50/p99 of the whole latency and of its two sides (see :func:`_paced_latency`)."""
    out = _percentiles([max(a - p, 0.0) for _, p, _, a in stamps])
    for side, values in (
        ("in", [max(c - p, 0.0) for _, p, c, _ in stamps]),
        ("out", [max(a - c, 0.0) for _, _, c, a in stamps]),
    ):
        pct = _percentiles(values)
        out[f"{side}_p50_ms"], out[f"{side}_p99_ms"] = pct["p50_ms"], pct["p99_ms"]
    return out


def _percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(int(len(lat) * 0.99), len(lat) - 1)] * 1000,
        "samples": len(lat),
    }


def _dump(path: Path | None, stamps: list[tuple[str, float, float, float]]) -> None:
    """Write the per-stream stamps of a trial (JSON) for a closer look; nothing if None."""
    if path is not None:
        path.write_text(json.dumps(stamps))


def latency_floor(
    rate: float, tmp: Path, seconds: float, dump: Path | None = None
) -> dict[str, float]:
    """The same paced load through ``HOP_FLOOR``: what reading one topic and writing
    another costs any Python pipeline on this broker, measured in the same run."""
    with EmbeddedBroker() as broker:
        settings = _settings(broker.bootstrap, tmp)
        asyncio.run(create_topics(settings))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOP_FLOOR,
                broker.bootstrap,
                settings.topic_chunks,
                settings.topic_responses,
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            while proc.stdout.readline().strip() != b"assigned":
                if proc.poll() is not None:
                    raise RuntimeError(f"passthrough exited with {proc.returncode}")
            stamps = asyncio.run(_paced_latency(settings, rate, seconds, markers_out=True))
        finally:
            _stop(proc)
    _dump(dump, stamps)
    return _split(stamps)


def latency_and_memory(
    rate: float,
    tmp: Path,
    seconds: float,
    *,
    memory: bool = True,
    extra_env: dict[str, str] | None = None,
    dump: Path | None = None,
) -> dict[str, float]:
    """Latency at ``rate`` on a fresh broker (its memory store slows as it grows: see the
    README), then (``memory``) memory with 10,000 streams in flight on the same worker.
    ``extra_env``: settings (``CHUNKSTITCH_*``) for this worker only."""
    with EmbeddedBroker() as broker:
        settings = _settings(
            broker.bootstrap, tmp, web_port=free_port(), idle_timeout_s=300, max_lifetime_s=3000
        )
        asyncio.run(create_topics(settings))
        proc = _worker(settings, tmp / "worker-lat.log", extra_env)
        busy_rss = 0.0
        try:
            _wait_ready(_http_ready(settings.web_port), proc)
            stamps = asyncio.run(_paced_latency(settings, rate, seconds, markers_out=False))
            idle_rss = _rss_mb(proc.pid)
            if memory:
                busy_rss = _in_flight_rss(broker.bootstrap, settings, proc.pid)
        finally:
            _stop(proc)
    _dump(dump, stamps)
    return {**_split(stamps), "rss_idle_mb": idle_rss, "rss_10k_mb": busy_rss}


def _in_flight_rss(bootstrap: str, settings: Settings, pid: int) -> float:
    """The worker's RSS once it holds 10,000 streams in flight (their first three chunks)."""
    rng = random.Random(9)
    recs = []
    for i in range(10_000):
        cid = f"inflight-{i}"
        for n, c in enumerate(text_stream(cid, 12, rng)[:3]):
            recs.append((cid.encode(), json.dumps(c).encode(), encode_headers(RecordMeta(seq=n))))
    asyncio.run(_preload(bootstrap, settings.topic_chunks, recs))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/readyz", timeout=2) as r:
            if json.loads(r.read())["in_flight"] >= 10_000:
                break
        time.sleep(0.5)
    return _rss_mb(pid)


def report_latency(
    peak: float,
    tmp: Path,
    seconds: float,
    trials: int,
    *,
    memory: bool = True,
    extra_env: dict[str, str] | None = None,
    dump: Path | None = None,
) -> None:
    rate = peak / 2
    print(
        f"\nlatency at half of (c)'s peak ({rate:,.0f} records/s, {seconds:.0f} s per trial, "
        f"fresh broker each, hop floor and worker interleaved): end marker published -> "
        f"response arrived; in = published -> output produced (its CreateTime), "
        f"out = produced -> arrived",
        flush=True,
    )
    if extra_env:
        print(f"  worker settings: {' '.join(f'{k}={v}' for k, v in extra_env.items())}")
    worker_runs, floor_runs = [], []
    lm: dict[str, float] = {}

    def line(r: dict[str, float]) -> str:
        return (
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (in {r['in_p50_ms']:.1f}"
            f"/{r['in_p99_ms']:.1f}, out {r['out_p50_ms']:.1f}/{r['out_p99_ms']:.1f})"
        )

    for trial in range(1, trials + 1):
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
        floor = latency_floor(rate, tmp, seconds, dump / f"floor-{trial}.json" if dump else None)
        lm = latency_and_memory(
            rate,
            tmp,
            seconds,
            memory=memory and trial == trials,
            extra_env=extra_env,
            dump=dump / f"worker-{trial}.json" if dump else None,
        )
        floor_runs.append(floor)
        worker_runs.append(lm)
        print(
            f"  trial {trial} ({lm['samples']:.0f} streams): chunkstitch {line(lm)} | "
            f"hop floor {line(floor)}",
            flush=True,
        )
    med = statistics.median
    print(
        f"median of {trials}: chunkstitch p50 {med(r['p50_ms'] for r in worker_runs):.1f} ms, "
        f"p99 {med(r['p99_ms'] for r in worker_runs):.1f} ms; hop floor p50 "
        f"{med(r['p50_ms'] for r in floor_runs):.1f} ms, "
        f"p99 {med(r['p99_ms'] for r in floor_runs):.1f} ms"
    )
    if memory:
        print(
            f"worker RSS: {lm['rss_idle_mb']:.0f} MB idle, "
            f"{lm['rss_10k_mb']:.0f} MB with 10,000 streams in flight"
        )


def backlog_check(streams: int, idle_timeout_s: float, partitions: int, tmp: Path) -> None:
    """A worker catching up on a preloaded backlog many times ``idle timeout x drain rate``
    long must not declare any stream idle: its next chunks are waiting in the partition.
    Prints the drain rate and every response status and dead-letter reason."""
    from aiokafka import TopicPartition

    from processor.kafka import read_to_end

    records = _records(streams, 20, seed=1)
    with EmbeddedBroker() as broker:
        settings = _settings(
            broker.bootstrap,
            tmp,
            web_port=free_port(),
            idle_timeout_s=idle_timeout_s,
            partitions=partitions,
        )
        asyncio.run(create_topics(settings))
        asyncio.run(_preload(broker.bootstrap, settings.topic_chunks, records))
        proc = _worker(settings, tmp / "worker-backlog.log")
        t0 = _wait_ready(_http_ready(settings.web_port), proc)
        try:
            _, t1 = asyncio.run(
                _count_until(broker.bootstrap, settings.topic_responses, streams, timeout_s=900)
            )
            time.sleep(idle_timeout_s + 1)  # late emissions and dead letters, if any
        finally:
            _stop(proc)

        def read(topic: str) -> list[Any]:
            tps = [TopicPartition(topic, i) for i in range(partitions)]
            return asyncio.run(read_to_end(settings, tps))

        responses, dead = read(settings.topic_responses), read(settings.topic_deadletter)
    rate = len(records) / (t1 - t0)
    status: dict[str, int] = {}
    incomplete_by_partition: dict[int, int] = {}
    for r in responses:
        meta = json.loads(r.value)["chunkstitch"]
        status[meta["status"]] = status.get(meta["status"], 0) + 1
        if meta["status"] != "complete":
            part = meta["source"]["partition"]
            incomplete_by_partition[part] = incomplete_by_partition.get(part, 0) + 1
    reasons: dict[str, int] = {}
    for r in dead:
        reason = json.loads(r.value)["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    print(
        f"backlog of {len(records):,} records ({streams:,} streams, {partitions} partitions), "
        f"idle timeout {idle_timeout_s:g} s: drained at {rate:,.0f} records/s, the backlog is "
        f"{len(records) / (idle_timeout_s * rate):.1f}x idle timeout x drain rate"
    )
    print(f"  responses: {len(responses):,} {status}; dead letters: {len(dead):,} {reasons}")
    if incomplete_by_partition:
        print(f"  not complete, by partition: {dict(sorted(incomplete_by_partition.items()))}")
    ok = status.get("complete", 0) == streams and not dead
    print(f"  {'PASS' if ok else 'FAIL'}: every stream complete, no dead letter")


def _spread(values: list[float], fmt: str) -> str:
    """``median (min to max)`` of the values."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def report_throughput(
    results: dict[str, list[dict[str, float]]], rounds: int, records: int
) -> float:
    """Print the table of medians and spreads and the same-round ratios; (c)'s median rate."""
    print(
        f"\nthroughput, {rounds} interleaved round(s) on {records:,} records each, "
        "median (min to max):"
    )
    print(
        "| variant | records/s | CPU us/record | broker CPU us/record | ready -> first output s "
        "| records/s by round |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for variant, runs in results.items():
        rates = ", ".join(f"{r['rate']:,.0f}" for r in runs)
        print(
            f"| {VARIANTS[variant]} | {_spread([r['rate'] for r in runs], ',.0f')} "
            f"| {_spread([r['cpu_us'] for r in runs], '.0f')} "
            f"| {_spread([r['broker_cpu_us'] for r in runs], '.0f')} "
            f"| {_spread([r['first_s'] for r in runs], '.2f')} | {rates} |"
        )
    c = results.get("worker")
    if c:
        for name, base in (("a", "aiokafka"), ("b", "faust"), ("q", "quix")):
            if base in results:
                ratios = [w["rate"] / o["rate"] for w, o in zip(c, results[base], strict=True)]
                cpu = [o["cpu_us"] / w["cpu_us"] for w, o in zip(c, results[base], strict=True)]
                print(
                    f"c/{name} = {_spread(ratios, '.2f')} (per round: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)}); CPU per record, {name}/c = "
                    f"{_spread(cpu, '.2f')}"
                )
    c0 = results.get("worker-no-usage")
    if c and c0:
        cost = [1 - w["rate"] / o["rate"] for w, o in zip(c, c0, strict=True)]
        print(
            f"usage rollups: cost {_spread([x * 100 for x in cost], '.1f')}% of throughput "
            "(same-round pairs)"
        )
    return statistics.median(r["rate"] for r in c) if c else 0.0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__)
    parser.add_argument("--streams", type=int, default=1000, help="streams of 20 chunks")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of variants")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--peak", type=float, default=None, help="skip (a)-(c); use this peak for the latency run"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=10, help="paced load per latency trial"
    )
    parser.add_argument("--latency-trials", type=int, default=3, help="latency trials")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the latency trials' worker only (CHUNKSTITCH_...); repeatable",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the 10,000-streams memory check"
    )
    parser.add_argument(
        "--latency-dump",
        type=Path,
        default=None,
        metavar="DIR",
        help="write per-stream (key, published, produced, arrived) stamps of each trial here",
    )
    parser.add_argument(
        "--no-lengths", action="store_true", help="skip the chunks-per-stream comparison"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        metavar="STREAMS",
        help="only the backlog check: STREAMS x 21 records preloaded (5000: 105,000), "
        "no stream may be declared idle",
    )
    parser.add_argument("--backlog-idle-s", type=float, default=2.0, help="its idle timeout")
    parser.add_argument("--backlog-partitions", type=int, default=4, help="its partitions")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    extra_env = {}
    for item in args.worker_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("CHUNKSTITCH_"):
            parser.error(f"--worker-env {item!r}: expected CHUNKSTITCH_NAME=VALUE")
        extra_env[name] = value
    latency = {"memory": not args.no_memory, "extra_env": extra_env, "dump": args.latency_dump}
    tmp = Path(tempfile.mkdtemp(prefix="chunkstitch-bench-"))
    if args.backlog:
        backlog_check(args.backlog, args.backlog_idle_s, args.backlog_partitions, tmp)
        return
    if args.peak:
        report_latency(args.peak, tmp, args.latency_seconds, args.latency_trials, **latency)
        return
    records = len(_records(args.streams, 20, seed=1))
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rnd in range(1, args.rounds + 1):
        for variant in variants:
            print(f"round {rnd}: {VARIANTS[variant]} on {records:,} records ...", flush=True)
            r = run_variant(variant, args.streams, 20, tmp)
            results[variant].append(r)
            print(
                f"  {r['rate']:,.0f} records/s, {r['cpu_us']:.0f} us CPU/record, "
                f"broker {r['broker_cpu_us']:.0f} us/record, first output after "
                f"{r['first_s']:.2f} s, {r['rss_mb']:.0f} MB RSS",
                flush=True,
            )
    peak = report_throughput(results, args.rounds, records)
    if not peak:
        return
    report_latency(peak, tmp, args.latency_seconds, args.latency_trials, **latency)
    if args.no_lengths:
        return
    print("\nchunks/s by stream length (same total chunks):", flush=True)
    total = args.streams * 20
    for length in (20, 500, 5000):
        n = max(total // length, 1)
        r = run_variant("worker", n, length, tmp)
        print(
            f"  {length:>5} chunks/stream x {n:>4} streams: {r['rate']:,.0f} records/s, "
            f"{r['cpu_us']:.0f} us CPU/record",
            flush=True,
        )
