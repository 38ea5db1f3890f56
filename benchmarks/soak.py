"""Soak: does a worker stay bounded as history grows? (``./dev bench soak``)

Publishes ``--completions`` tiny completions (one chunk with usage plus an end marker,
through a raw batched aiokafka producer) whose request times are spread evenly over 30
simulated days, in ``--phases`` phases. After every phase the worker is killed with
SIGKILL and restarted. At each phase it reports the worker's RSS (and CPU) together with
its usage server child process, which holds the read model, the time from the
restart to the first response of the new phase, ``GET /usage`` latency (p50/p99 of a
mix of queries, 8 at a time) and, next to the worker's, the embedded broker's own RSS
and CPU (its memory store never deletes anything, so it grows with the run). At the end
the totals on ``/usage`` are checked against the number of completions published.

Targets (issue 13): RSS after warm-up within 25% of its first value; restart-to-first-
output last/first <= 1.5; /usage p99 not growing with history.

One fresh embedded broker per run, loopback only, every loop bounded in count and time.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.admin import create_topics
from processor.broker import EmbeddedBroker, free_port
from processor.settings import Settings
from topics import RecordMeta, encode_headers

DAY_MS = 86_400_000
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
MODELS = ("gpt-4o-mini", "claude-sonnet", "llama-3-70b")
T_END = int(time.time() * 1000) // DAY_MS * DAY_MS
T_START = T_END - 30 * DAY_MS
USAGE_STALL_S = 120
"""The final check gives up when ``/usage`` has not grown for this long."""


def _records(first: int, count: int, total: int) -> list[tuple[bytes, bytes, list[Any]]]:
    out = []
    span = T_END - T_START
    for i in range(first, first + count):
        cid = f"soak-{i:08d}"
        tenant = TENANTS[i % len(TENANTS)]
        model = MODELS[i % len(MODELS)]
        started = T_START + span * i // total
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": started // 1000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 10 + i % 7,
                "completion_tokens": 3,
                "total_tokens": 13 + i % 7,
            },
        }
        meta = RecordMeta(seq=0, tenant=tenant, provider="openai", started_at_ms=started)
        key = cid.encode()
        out.append((key, json.dumps(chunk).encode(), encode_headers(meta)))
        out.append((key, b"", encode_headers(RecordMeta(end_count=1, end_reason="done"))))
    return out


async def _publish(broker: str, topic: str, records: list[Any]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=broker, acks=1, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        pending = []
        for key, value, headers in records:
            pending.append(await producer.send(topic, value, key=key, headers=headers))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class Outputs:
    """Counts distinct completion ids on the responses topic (a background consumer)."""

    def __init__(self, broker: str, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.seen: set[bytes] = set()
        self.records = 0
        self.first_at: dict[int, float] = {}
        self.phase_of: dict[bytes, int] = {}
        self._stop = asyncio.Event()

    async def run(self, per_phase: int) -> None:
        consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.broker, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
                now = time.monotonic()
                for recs in batch.values():
                    for rec in recs:
                        self.records += 1
                        if rec.key is None or rec.key in self.seen:
                            continue
                        self.seen.add(rec.key)
                        phase = int(rec.key[5:]) // per_phase
                        self.first_at.setdefault(phase, now)
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self._stop.set()


async def _records_on(broker: str, topics: list[str]) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=None)
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        ends = await consumer.end_offsets(tps)
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


def _metrics(port: int) -> dict[str, float]:
    """The worker's own figures of what it holds (usage side and stitcher)."""
    want = {
        "chunkstitch_usage_open_buckets": "open_buckets",
        "chunkstitch_usage_dedup_ids": "dedup_ids",
        "chunkstitch_usage_late_completions_total": "late",
        "chunkstitch_streams_in_flight": "in_flight",
    }
    out = dict.fromkeys(want.values(), 0.0)
    try:
        text = _get(port, "/metrics")[1].decode()
    except Exception:
        return out
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in want:
            out[want[name]] += float(line.rsplit(" ", 1)[1])
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tree_rss_mb(pid: int) -> float:
    """The worker and its children (the usage server process holds the read model)."""
    return _rss_mb(pid) + sum(_rss_mb(c) for c in _children(pid))


def _tree_cpu_s(pid: int) -> float:
    return _cpu_s(pid) + sum(_cpu_s(c) for c in _children(pid))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(port: int, path: str, timeout: float = 30) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        body = r.read()
    return time.perf_counter() - t, body


def _ready(port: int) -> bool:
    try:
        return bool(json.loads(_get(port, "/readyz", 1)[1])["ready"])
    except Exception:
        return False


def _usage_latency(port: int, requests: int = 48) -> tuple[float, float]:
    """p50 and p99 (ms) of a mix of /usage queries, 8 in flight."""
    since = T_END - 2 * DAY_MS
    paths = [
        "/usage?window=1d&by=tenant",
        f"/usage?window=1h&by=tenant,model&since={since}&limit=500",
        "/usage?window=1m&by=tenant&since=3h&limit=100",
        "/usage?window=1d&by=model&tenant=acme",
    ]
    with ThreadPoolExecutor(8) as pool:
        lat = list(pool.map(lambda i: _get(port, paths[i % len(paths)])[0], range(requests)))
    lat.sort()
    return statistics.median(lat) * 1000, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000


def _add_by_day(out: dict[int, int], rows: list[dict[str, Any]]) -> dict[int, int]:
    """Add the requests of usage day rows (any grouping) to ``out`` by day; returns it."""
    for row in rows:
        day = int(row["key"]["window_start_ms"])
        out[day] = out.get(day, 0) + int(row["totals"]["requests"])
    return out


def _usage_by_day(port: int) -> dict[int, int]:
    """Requests counted by the live ``/usage`` per day (window start), over everything
    its day rows hold, page by page (empty while the read model is not caught up: 503)."""
    out: dict[int, int] = {}
    cursor = ""
    for _ in range(1000):  # pages of 10,000 rows: far beyond a month of day rows
        try:
            body = _get(port, f"/usage?window=1d&by=tenant&limit=10000{cursor}")[1]
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return {}
            raise
        page = json.loads(body)
        _add_by_day(out, page["rows"])
        if not page.get("next_cursor"):
            return out
        cursor = f"&cursor={page['next_cursor']}"
    raise RuntimeError("/usage returned more than 1000 pages of day rows")


def _published_by_day(total: int) -> dict[int, int]:
    """Completions published per day of request time (as :func:`_records` spreads them)."""
    out: dict[int, int] = {}
    span = T_END - T_START
    for i in range(total):
        started = T_START + span * i // total
        day = started // DAY_MS * DAY_MS
        out[day] = out.get(day, 0) + 1
    return out


async def _explain_mismatch(settings: Settings, published: int, by_day: dict[int, int]) -> None:
    """The days where the live /usage differs from what was published, next to what the
    hourly rollup topic itself says (one read of that topic, as ``chunkstitch usage
    --window 1d`` makes): tells a view that missed rollups from rollups never written."""
    from processor.usage import UsageQuery, load_view

    topic_days: dict[int, int] | None = None
    try:
        view = await asyncio.wait_for(load_view(settings, window="1d"), 600)
        page = view.query(UsageQuery.parse({"window": "1d", "by": "tenant", "limit": 10_000}))
        topic_days = _add_by_day({}, page["rows"])
    except Exception as exc:  # a diagnosis only: say why it is missing
        print(f"  (the hourly topic could not be read: {exc})", file=sys.stderr)
    want = _published_by_day(published)
    for day in sorted(set(want) | set(by_day)):
        if want.get(day, 0) != by_day.get(day, 0):
            on_topic = "?" if topic_days is None else f"{topic_days.get(day, 0):,}"
            print(
                f"  day {time.strftime('%Y-%m-%d', time.gmtime(day / 1000))}: /usage "
                f"{by_day.get(day, 0):,}, hourly topic {on_topic}, published {want.get(day, 0):,}",
                file=sys.stderr,
            )


PROBE = Path(__file__).with_name("memprobe")


def _worker(settings: Settings, log: Path, probe: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    env = {**os.environ, **settings.to_env()}
    if probe is not None:  # tracemalloc in the worker and its usage server (memprobe/)
        env["CS_MEMPROBE_DIR"] = str(probe)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "processor", "worker"], env=env, stdout=out, stderr=out
    )


def _probe(probe: Path, name: str, timeout_s: float = 180) -> None:
    """Ask the worker and its usage server for a memory report; wait for both."""
    (probe / f"req-{name}").touch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(list(probe.glob(f"{name}-*.txt"))) + len(list(probe.glob(f"{name}-*.err"))) >= 2:
            return
        time.sleep(0.5)
    print(f"  memory probe {name}: no report from both processes", file=sys.stderr)


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")


async def soak(
    completions: int,
    phases: int,
    partitions: int,
    tmp: Path,
    usage: bool = True,
    probe: Path | None = None,
) -> list[dict[str, Any]]:
    per_phase = completions // phases
    rows: list[dict[str, Any]] = []
    with EmbeddedBroker(log_path=tmp / "broker.log") as broker:
        assert broker._proc is not None
        bpid = broker._proc.pid
        settings = Settings(
            broker=broker.bootstrap,
            app_id=f"soak-{random.randrange(1 << 30)}",
            partitions=partitions,
            session_timeout_s=3,
            heartbeat_interval_s=0.5,
            idle_timeout_s=10,
            data_dir=str(tmp / "data"),
            log_level="WARNING",
            web_port=free_port(),
            usage_port=free_port(),
            # the dedup horizon counts real time: a soak compresses 30 days into minutes,
            # so the defaults (10 min, 1 h) would hold a large part of the whole run; the
            # stitcher's emitted-ids memory likewise
            usage_dedup_s=60,
            emitted_memory_s=60,
            max_lifetime_s=30,  # must stay below the emitted memory; one chunk each here
            # the read model's 1-minute rows likewise (6 h of a real month; the period
            # also selects what a restarted usage server reads back by the records' real
            # timestamps). Its hour and day rows keep the default 35 days, as in
            # production: they cover the whole simulated month, and the exact totals at
            # the end are read from them (the live /usage), not from the whole topics
            usage_view_minutes_s=60,
            usage_enabled=usage,
        )
        await create_topics(settings)
        outputs = Outputs(broker.bootstrap, settings.topic_responses)
        reader = asyncio.ensure_future(outputs.run(per_phase))
        proc = _worker(settings, tmp / "worker.log", probe)
        await asyncio.to_thread(_wait, lambda: _ready(settings.web_port), 90, "worker ready")
        began = time.monotonic()
        broker_cpu0 = _cpu_s(bpid)
        try:
            for phase in range(phases):
                spawned = time.monotonic()
                if phase:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                    spawned = time.monotonic()
                    proc = _worker(settings, tmp / "worker.log", probe)
                t_pub = time.monotonic()
                await _publish(
                    broker.bootstrap,
                    settings.topic_chunks,
                    _records(phase * per_phase, per_phase, completions),
                )
                publish_s = time.monotonic() - t_pub
                want = (phase + 1) * per_phase
                deadline = time.monotonic() + 1800
                last_print = 0.0
                while len(outputs.seen) < want:
                    if proc.poll() is not None:
                        tail = (tmp / "worker.log").read_text(errors="replace")[-3000:]
                        raise RuntimeError(
                            f"worker exited with {proc.returncode}; its log ends:\n{tail}"
                        )
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"phase {phase}: {len(outputs.seen)}/{want} outputs")
                    if time.monotonic() - last_print > 10:
                        last_print = time.monotonic()
                        print(
                            f"  phase {phase + 1}/{phases}: {len(outputs.seen):,}/{want:,} "
                            f"completions out, {time.monotonic() - began:.0f}s",
                            file=sys.stderr,
                            flush=True,
                        )
                    await asyncio.sleep(0.2)
                first = outputs.first_at.get(phase, time.monotonic())
                p50 = p99 = float("nan")
                if usage:
                    await asyncio.sleep(2.5)  # rollups published (every 1 s), view updated
                    p50, p99 = await asyncio.to_thread(_usage_latency, settings.usage_port)
                gauges = _metrics(settings.web_port)
                counted = (
                    sum((await asyncio.to_thread(_usage_by_day, settings.usage_port)).values())
                    if usage
                    else want
                )
                if probe is not None:
                    await asyncio.to_thread(_probe, probe, f"phase{phase + 1:02d}")
                children = _children(proc.pid)
                row = {
                    **gauges,
                    "phase": phase + 1,
                    "completions": want,
                    "worker_rss_mb": _tree_rss_mb(proc.pid),
                    "worker_own_rss_mb": _rss_mb(proc.pid),
                    "usage_server_rss_mb": sum(_rss_mb(c) for c in children),
                    "restart_to_first_s": (first - spawned) if phase else None,
                    "phase_s": time.monotonic() - spawned,
                    "publish_s": publish_s,
                    "usage_p50_ms": p50,
                    "usage_p99_ms": p99,
                    "broker_rss_mb": _rss_mb(bpid),
                    "broker_cpu_s": _cpu_s(bpid) - broker_cpu0,
                    "worker_cpu_s": _tree_cpu_s(proc.pid),
                    "responses_records": outputs.records,
                    "usage_behind": want - counted,
                }
                rows.append(row)
                _print_row(row)
            total = phases * per_phase if not usage else 0
            by_day: dict[int, int] = {}
            # The usage fold may still be catching up (after a restart it refolds what
            # its last checkpoint had not reached): wait while /usage still grows, give
            # up after USAGE_STALL_S without growth (no fixed limit the run outgrows).
            waited, last_growth, last_total = time.monotonic(), time.monotonic(), -1
            while usage:
                by_day = await asyncio.to_thread(_usage_by_day, settings.usage_port)
                total = sum(by_day.values())
                if total >= phases * per_phase or proc.poll() is not None:
                    break
                if total != last_total:
                    last_total, last_growth = total, time.monotonic()
                elif time.monotonic() - last_growth > USAGE_STALL_S:
                    break
                print(
                    f"  usage: {total:,}/{phases * per_phase:,} counted on /usage, "
                    f"{time.monotonic() - waited:.0f}s after the last phase",
                    file=sys.stderr,
                    flush=True,
                )
                await asyncio.sleep(2)
            usage_settle_s = time.monotonic() - waited
            if usage and total != phases * per_phase:
                await _explain_mismatch(settings, phases * per_phase, by_day)
            rollup_records = await _records_on(
                broker.bootstrap, [settings.topic_rollups, settings.rollups_hourly_topic]
            )
            rows.append(
                {
                    "usage_total": total,
                    "usage_settle_s": usage_settle_s,
                    "published": phases * per_phase,
                    "rollup_records": rollup_records,
                }
            )
        finally:
            outputs.stop()
            await reader
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


HEADER = (
    "| phase | completions | phase time | worker RSS | restart -> first output | /usage p50 "
    "| /usage p99 | broker RSS | broker CPU (cum.) | worker CPU (with its usage server) |"
)


def _print_row(r: dict[str, Any]) -> None:
    restart = f"{r['restart_to_first_s']:.1f} s" if r["restart_to_first_s"] is not None else "-"
    print(
        f"| {r['phase']} | {r['completions']:,} | {r['phase_s']:.0f} s "
        f"| {r['worker_rss_mb']:.0f} MB | {restart} "
        f"| {r['usage_p50_ms']:.1f} ms | {r['usage_p99_ms']:.1f} ms | {r['broker_rss_mb']:.0f} MB "
        f"| {r['broker_cpu_s']:.0f} s | {r['worker_cpu_s']:.0f} s |",
        flush=True,
    )
    print(
        f"    held: {r['open_buckets']:.0f} open usage buckets, {r['dedup_ids']:.0f} dedup ids, "
        f"{r['in_flight']:.0f} streams in flight; {r['late']:.0f} late completions so far; "
        f"/usage {r['usage_behind']:,} completions behind the outputs; "
        f"RSS: worker {r['worker_own_rss_mb']:.0f} MB, its usage server "
        f"{r['usage_server_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks soak")
    parser.add_argument("--completions", type=int, default=1_000_000)
    parser.add_argument("--phases", type=int, default=10)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--no-usage", action="store_true", help="worker without usage rollups (for comparison)"
    )
    parser.add_argument(
        "--memprofile",
        type=Path,
        metavar="DIR",
        help="tracemalloc in the worker and its usage server; a memory report of each "
        "into DIR at the end of every phase (slower; RSS then includes tracemalloc's own)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="run in DIR and keep it (the worker's and the broker's logs) instead of a "
        "temporary directory",
    )
    args = parser.parse_args(argv)
    if args.memprofile is not None:
        args.memprofile.mkdir(parents=True, exist_ok=True)
        args.memprofile = args.memprofile.resolve()
    print(
        f"soak: {args.completions:,} completions over 30 simulated days, {args.phases} "
        f"phases, kill -9 + restart between phases, {args.partitions} partitions",
        flush=True,
    )
    print(HEADER)
    print("|" + "---|" * 10)
    t0 = time.monotonic()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = (
            str(args.keep.resolve())
            if args.keep is not None
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="cs-soak-"))
        )
        rows = asyncio.run(
            soak(
                args.completions,
                args.phases,
                args.partitions,
                Path(tmp),
                not args.no_usage,
                args.memprofile,
            )
        )
    check = rows.pop()
    print(f"\nrun took {time.monotonic() - t0:.0f} s")
    print(
        f"/usage total requests {check['usage_total']:,} of {check['published']:,} published "
        f"({'exact' if check['usage_total'] == check['published'] else 'MISMATCH'}); "
        f"{check['rollup_records']:,} rollup records on the two rollup topics; "
        f"/usage settled {check['usage_settle_s']:.0f} s after the last phase"
    )
    if len(rows) >= 3:
        warm = rows[1]["worker_rss_mb"]
        worst = max(abs(r["worker_rss_mb"] - warm) / warm for r in rows[1:])
        restarts = [r["restart_to_first_s"] for r in rows if r["restart_to_first_s"] is not None]
        print(f"RSS after warm-up (phase 2 on): within {worst:.0%} of {warm:.0f} MB (target 25%)")
        print(
            f"restart -> first output last/first: {restarts[-1] / restarts[0]:.2f} (target <= 1.5)"
        )
        print(
            f"/usage p99 first/last: {rows[0]['usage_p99_ms']:.1f} / "
            f"{rows[-1]['usage_p99_ms']:.1f} ms"
        )
