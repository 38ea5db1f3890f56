"""Does reading usage slow stitching? (``./dev bench usage_read``)

Rounds, each on a **fresh embedded broker** and worker with the usage history loaded
again (tiny completions over 30 simulated days, stitched and in the usage view before the
round's measurement). Paced stitching load (20-chunk streams, end marker to response
latency measured as in ``./dev bench e2e``), quiet, and with bursts of 200 concurrent
``GET /usage`` requests every second (a separate load process, so the measuring process is
not slowed by it). The in-memory broker slows as its store grows (within minutes its CPU
per trial had tripled and later rounds were void), so no round inherits another's store.

By default (``--slice 4``) quiet and loaded alternate in **slices** of 4 s within one
unbroken run of the stitching load (``2 x --seconds`` a round), in the order L Q Q L L Q
..., so the broker's drift within the round weighs on both kinds alike; a stream counts
for the slice its end marker was sent in, except in the first and last ``--guard`` seconds
of a slice, where the other kind's effect may still reach. The summary bootstraps the
pooled p99 ratio over pairs of neighbouring slices for its 95% interval. With
``--slice 0`` a round is separate trials instead, quiet and loaded in an order that
alternates across rounds (quiet first in odd rounds); those measured mostly the drift:
the second trial of a round was always the worse one.

To tell CPU contention from anything else, every trial reports the CPU seconds that the
worker, its usage server process, the broker, the load generator, this measuring process
and everything else on the machine used meanwhile. ``--pin`` puts the measurer, the
broker and the worker on CPU 0 and the usage server and the load generator on CPU 1
(``sched_setaffinity`` on every thread, as ``taskset -a -p`` does), so the requests cannot
take the stitcher's core. ``--nice N`` adds a third trial per round: loaded, with the
usage server at niceness N (every thread, ``setpriority``), the other loaded trial at 0;
the two loaded kinds swap order every round.

Every round is printed as it ends. A round in which some response had not arrived 60 s
after the last send is void and left out (the worker fell behind; the CPU columns say
on what). The summary gives the ratios over every round and over the clean ones, where
the rest of the machine (other people's jobs) used at most ``--other-max`` cores during
each trial, and the p99 of all quiet samples against all loaded ones (pooled).

Target (issue 13): the loaded p99 at most 1.10 x the quiet p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from benchmarks.e2e import (
    _cpu_s,
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
import asyncio, json, resource, sys, time
import aiohttp
async def main(port, burst, seconds):
    paths = ["/usage?window=1d&by=tenant", "/usage?window=1h&by=tenant,model&limit=200",
             "/usage?window=1m&by=tenant&since=3h&limit=100"]
    done = failed = 0
    took = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=burst)) as s:
        async def one(i):
            nonlocal done, failed
            t0 = time.monotonic()
            try:
                async with s.get(f"http://127.0.0.1:{port}{paths[i % 3]}") as r:
                    await r.read()
                    done += r.status == 200
                    failed += r.status != 200
                    took.append(time.monotonic() - t0)
            except Exception:
                failed += 1
        if len(sys.argv) > 4:  # slices: bursts at given wall-clock times only
            for at in json.loads(sys.argv[4]):
                await asyncio.sleep(max(0.0, at - time.time()))
                await asyncio.gather(*(one(i) for i in range(burst)))
        else:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.monotonic()
                await asyncio.gather(*(one(i) for i in range(burst)))
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
    took.sort()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "ok": done, "failed": failed, "cpu_s": ru.ru_utime + ru.ru_stime,
        "p50_ms": took[len(took) // 2] * 1000 if took else 0.0,
        "p99_ms": took[min(int(len(took) * 0.99), len(took) - 1)] * 1000 if took else 0.0,
    }), flush=True)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
"""

T = TypeVar("T")

ROLES = ("worker", "usage", "broker", "measurer", "load", "other")


def _tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _usage_pid(worker: int, timeout_s: float = 30.0) -> int:
    """The worker's usage server process (``python -m processor.usage``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in _children(worker):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"processor.usage" in cmd:
                return pid
        time.sleep(0.1)
    raise RuntimeError(
        f"no usage server process under worker {worker} after {timeout_s:.0f}s; "
        "run with CHUNKSTITCH_USAGE_SERVER=process (the default) and see the worker log"
    )


def _pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` on ``cpu`` (threads started later inherit it)."""
    for tid in _tids(pid):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(tid, {cpu})


def _renice(pid: int, nice: int) -> None:
    """Every thread of ``pid`` at niceness ``nice`` (Linux niceness is per thread)."""
    for tid in _tids(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise SystemExit(
                f"cannot set niceness {nice} on the usage server (thread {tid}): lowering it "
                "needs root or CAP_SYS_NICE; run as root or leave out --nice"
            ) from None


def _busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all CPUs, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Trial:
    kind: str
    lat: list[float]
    wall_s: float
    cpu: dict[str, float]
    load: dict[str, Any] = field(default_factory=dict)
    missing: int = 0
    """Completions whose response had not arrived 60 s after the last send."""

    @property
    def other_cores(self) -> float:
        """What the rest of the machine used meanwhile, in cores."""
        return self.cpu["other"] / self.wall_s

    @property
    def p(self) -> dict[str, float]:
        if not self.lat:  # not one response arrived: the round is void
            return {"p50_ms": float("inf"), "p99_ms": float("inf"), "samples": 0}
        return _percentiles(self.lat)


async def _paced_latency(
    settings: Settings, rate: float, seconds: float, seed: int
) -> tuple[list[float], int]:
    """As ``./dev bench e2e`` measures it (end marker sent -> response arrived), but the
    reader starts at the end of the responses topic, after the history. Also how many
    responses had not arrived 60 s after the last send."""
    samples, missing = await _paced_samples(settings, rate, seconds, seed)
    return [lat for _, lat in samples], missing


async def _paced_samples(
    settings: Settings, rate: float, seconds: float, seed: int, start_at: float | None = None
) -> tuple[list[tuple[float, float]], int]:
    """(wall-clock time the end marker was sent, latency) of every response that arrived,
    and how many had not arrived 60 s after the last send. Sending starts at the wall-clock
    time ``start_at`` if given, else at once."""
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
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
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
    except TimeoutError:
        pass  # reported as missing: the worker fell behind
    finally:
        await c.stop()
    got = [(sent_at[k], max(arrived_at[k] - sent_at[k], 0.0)) for k in sent_at if k in arrived_at]
    return got, len(sent_at) - len(got)


class Bench:
    def __init__(self, args: argparse.Namespace, settings: Settings, pids: dict[str, int]) -> None:
        self.args = args
        self.settings = settings
        self.pids = pids

    def _cpu(self) -> dict[str, float]:
        out = {role: _cpu_s(pid) for role, pid in self.pids.items()}
        out["measurer"] = time.process_time()
        out["busy"] = _busy_s()
        return out

    def pin(self) -> None:
        """With ``--pin``, every thread (those started since the last call too) on its CPU."""
        if self.args.pin:
            for role, cpu in (("worker", 0), ("broker", 0), ("usage", 1)):
                _pin(self.pids[role], cpu)
            _pin(os.getpid(), 0)

    def start_load(self, *tail: str) -> subprocess.Popen[str]:
        """The /usage load process: bursts of ``--burst`` requests (see ``LOAD``)."""
        cmd = [sys.executable, "-c", LOAD, str(self.settings.usage_port), str(self.args.burst)]
        cmd += tail
        if self.args.pin:
            cmd = ["taskset", "-c", "1", *cmd]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def spent(
        self, before: dict[str, float], after: dict[str, float], load: subprocess.Popen[str] | None
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """CPU seconds by role between two ``_cpu`` readings, and the load's own report."""
        cpu = {role: after[role] - before[role] for role in after}
        info: dict[str, Any] = {}
        cpu["load"] = 0.0
        if load is not None:
            out, _ = load.communicate(timeout=60)
            info = json.loads(out)
            # the load process's whole life (it starts just before, ends ~2 s after)
            cpu["load"] = float(info["cpu_s"])
        ours = sum(cpu[r] for r in ("worker", "usage", "broker", "measurer"))
        cpu["other"] = max(cpu.pop("busy") - ours - cpu["load"], 0.0)
        return cpu, info

    def trial(self, kind: str, seed: int, nice: int | None, seconds: float | None = None) -> Trial:
        args = self.args
        seconds = args.seconds if seconds is None else seconds
        self.pin()
        if nice is not None:
            _renice(self.pids["usage"], nice)
        load = None if kind == "quiet" else self.start_load(str(seconds + 2))
        before, t0 = self._cpu(), time.monotonic()
        lat, missing = asyncio.run(_paced_latency(self.settings, args.rate, seconds, seed))
        after, wall = self._cpu(), time.monotonic() - t0
        cpu, info = self.spent(before, after, load)
        return Trial(kind, lat, wall, cpu, info, missing)


@dataclass
class Sliced:
    """One sliced measurement: the stitching load runs throughout, the /usage bursts only
    in the loaded slices; ``slices`` holds each slice's kind and the latencies of the
    streams whose end marker was sent inside it (outside its guard bands)."""

    whole: Trial
    slices: list[tuple[str, list[float]]]

    def kind(self, kind: str) -> list[float]:
        return [x for k, lat in self.slices if k == kind for x in lat]

    def pairs(self) -> list[tuple[list[float], list[float]]]:
        """(quiet, loaded) latencies of each pair of neighbouring slices."""
        out = []
        for i in range(0, len(self.slices) - 1, 2):
            a, b = self.slices[i], self.slices[i + 1]
            quiet, loaded = (a[1], b[1]) if a[0] == "quiet" else (b[1], a[1])
            out.append((quiet, loaded))
        return out


def _pattern(n_pairs: int) -> list[str]:
    """loaded, quiet, quiet, loaded, loaded, quiet, ...: every pair of slices in the
    opposite order of the one before, so a drift within the round (the broker slowing as
    its store grows) weighs on both kinds alike."""
    out: list[str] = []
    for j in range(n_pairs):
        out += ["loaded", "quiet"] if j % 2 == 0 else ["quiet", "loaded"]
    return out


def _bursts(pattern: list[str], t0: float, slice_s: float, guard_s: float) -> list[float]:
    """Wall-clock times of the bursts: one a second in each loaded slice, the first at
    its guard band's end, none in the closing guard band."""
    out = []
    for i, kind in enumerate(pattern):
        if kind == "loaded":
            k = 0
            while guard_s + k < slice_s - guard_s:
                out.append(t0 + i * slice_s + guard_s + k)
                k += 1
    return out


def _slot(sent: float, t0: float, slice_s: float, guard_s: float, n: int) -> int | None:
    """Index of the slice a stream sent at ``sent`` belongs to; None in a guard band
    (the first and last ``guard_s`` of a slice, where the other kind's effect may reach)."""
    i, off = divmod(sent - t0, slice_s)
    if 0 <= i < n and guard_s <= off < slice_s - guard_s:
        return int(i)
    return None


def _sliced(bench: Bench, seed: int) -> Sliced:
    """The stitching load for ``2 x --seconds`` in slices of ``--slice`` seconds, the
    /usage bursts only in the loaded ones (see ``_pattern``)."""
    args = bench.args
    n_pairs = max(round(args.seconds / args.slice), 1)
    pattern = _pattern(n_pairs)
    bench.pin()
    t0 = time.time() + 2.0  # the load process is up by then
    load = bench.start_load("0", json.dumps(_bursts(pattern, t0, args.slice, args.guard)))
    seconds = len(pattern) * args.slice
    before, t1 = bench._cpu(), time.monotonic()
    got, missing = asyncio.run(
        _paced_samples(bench.settings, args.rate, seconds, seed, start_at=t0)
    )
    after, wall = bench._cpu(), time.monotonic() - t1
    cpu, info = bench.spent(before, after, load)
    slices: list[tuple[str, list[float]]] = [(kind, []) for kind in pattern]
    for sent, lat in got:
        i = _slot(sent, t0, args.slice, args.guard, len(pattern))
        if i is not None:
            slices[i][1].append(lat)
    return Sliced(Trial("sliced", [lat for _, lat in got], wall, cpu, info, missing), slices)


def _sliced_line(m: Sliced) -> str:
    q, lo = _percentiles(m.kind("quiet")), _percentiles(m.kind("loaded"))
    t = m.whole
    cpu = " ".join(f"{r} {t.cpu[r]:.1f}" for r in ROLES)
    text = (
        f"  quiet p50 {q['p50_ms']:6.1f} p99 {q['p99_ms']:7.1f} ms (n={q['samples']}) | "
        f"loaded p50 {lo['p50_ms']:6.1f} p99 {lo['p99_ms']:7.1f} ms (n={lo['samples']}) | "
        f"ratio p99 {lo['p99_ms'] / q['p99_ms']:.2f} p50 {lo['p50_ms'] / q['p50_ms']:.2f}\n"
        f"  CPU s in {t.wall_s:.0f}s: {cpu}"
    )
    return text + _extras(t)


def _extras(t: Trial) -> str:
    """What a trial's line ends with: responses missing, the /usage load's own figures."""
    text = f" | {t.missing} missing" if t.missing else ""
    if t.load:
        text += (
            f" | /usage {t.load['ok']} ok {t.load['failed']} failed, "
            f"p50 {t.load['p50_ms']:.0f} p99 {t.load['p99_ms']:.0f} ms"
        )
    return text


def _line(label: str, t: Trial, quiet: Trial | None) -> str:
    p = t.p
    text = f"  {label:<11} p50 {p['p50_ms']:6.1f} p99 {p['p99_ms']:7.1f} ms (n={p['samples']})"
    if quiet is not None:
        text += f" ratio {p['p99_ms'] / quiet.p['p99_ms']:.2f}"
    else:
        text += " " * 11
    cpu = " ".join(f"{r} {t.cpu[r]:.1f}" for r in ROLES)
    text += f" | CPU s in {t.wall_s:.0f}s: {cpu}"
    return text + _extras(t)


def _spread(ratios: list[float]) -> str:
    return (
        f"median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
        f"max {max(ratios):.2f}, {len(ratios)} pairs)"
    )


def _pooled(trials: list[Trial]) -> float:
    return _percentiles([x for t in trials for x in t.lat])["p99_ms"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks usage_read")
    parser.add_argument("--rate", type=float, default=600.0, help="stitching records/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per trial")
    parser.add_argument(
        "--pairs", type=int, default=6, help="rounds of quiet + loaded, each on a fresh broker"
    )
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds of a warm-up trial per round"
    )
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--history", type=int, default=20_000, help="completions of history")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="measurer, broker and worker on CPU 0; usage server and load generator on CPU 1",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        metavar="N",
        help="a third trial per round: loaded, the usage server at niceness N (others at 0)",
    )
    parser.add_argument(
        "--other-max",
        type=float,
        default=0.25,
        metavar="CORES",
        help="a round is clean if the rest of the machine used at most this meanwhile",
    )
    parser.add_argument(
        "--slice",
        type=float,
        default=4.0,
        metavar="S",
        help="slices of S seconds, quiet and loaded alternating within one run of the load "
        "(2 x --seconds per round); 0 = separate quiet and loaded trials",
    )
    parser.add_argument(
        "--guard",
        type=float,
        default=0.25,
        metavar="S",
        help="streams sent in the first or last S seconds of a slice are not counted",
    )
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    if args.slice and args.nice is not None:
        raise SystemExit("--nice needs separate trials: add --slice 0")
    if args.slice and not 0 <= 2 * args.guard < min(args.slice, 1.0):
        raise SystemExit("--guard must be under half of --slice and of a second; lower it")
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("--pin needs CPUs 0 and 1 available to this process; leave out --pin")
    extra = dict(kv.split("=", 1) for kv in args.worker_env)
    cache_s = extra.get("CHUNKSTITCH_USAGE_CACHE_S", Settings().usage_cache_s)
    loaded_kinds = ["loaded"] if args.nice is None else ["loaded", f"loaded+n{args.nice}"]
    shape = (
        f"{2 * max(round(args.seconds / args.slice), 1)} alternating quiet/loaded slices x "
        f"{args.slice:g} s (guard {args.guard:g} s)"
        if args.slice
        else f"{1 + len(loaded_kinds)} trials x {args.seconds:.0f} s"
    )
    print(
        f"usage_read: {args.pairs} rounds of {shape} "
        f"at {args.rate:.0f} records/s, bursts of {args.burst} /usage per second, "
        f"{'pinned' if args.pin else 'not pinned'} ({os.cpu_count()} CPUs), a fresh broker "
        f"per round; usage cache {cache_s} s",
        flush=True,
    )
    if args.slice:
        _main_sliced(args, extra)
        return
    rounds: list[dict[str, Trial]] = []
    void = 0
    with tempfile.TemporaryDirectory(prefix="cs-usage-read-") as tmp_s:
        for n in range(args.pairs):
            order = ["quiet", *loaded_kinds] if n % 2 == 0 else ["quiet", *loaded_kinds][::-1]
            row = _round(args, Path(tmp_s) / f"round-{n + 1}", n, order, extra)
            print(f"round {n + 1} (fresh broker; order {', '.join(order)}):", flush=True)
            for kind in order:
                print(_line(kind, row[kind], None if kind == "quiet" else row["quiet"]), flush=True)
            lost = sum(t.missing for t in row.values())
            if lost:
                void += 1
                print(
                    f"round {n + 1} is void (not counted): {lost} responses had not arrived "
                    "60 s after the last send (the worker fell behind; see the CPU columns)",
                    flush=True,
                )
                continue
            rounds.append(row)
    if void:
        print(f"{void} void round(s) of {args.pairs} left out")
    _summary(rounds, loaded_kinds, args.other_max)


def _main_sliced(args: argparse.Namespace, extra: dict[str, str]) -> None:
    rounds: list[Sliced] = []
    void = 0
    with tempfile.TemporaryDirectory(prefix="cs-usage-read-") as tmp_s:
        for n in range(args.pairs):
            m = _fresh(args, Path(tmp_s) / f"round-{n + 1}", n, extra, lambda b, n=n: _sliced(b, n))
            print(f"round {n + 1} (fresh broker; {len(m.slices)} slices):", flush=True)
            print(_sliced_line(m), flush=True)
            if m.whole.missing:
                void += 1
                print(
                    f"round {n + 1} is void (not counted): {m.whole.missing} responses had not "
                    "arrived 60 s after the last send (the worker fell behind; see the CPU "
                    "columns)",
                    flush=True,
                )
                continue
            rounds.append(m)
    if void:
        print(f"{void} void round(s) of {args.pairs} left out")
    _sliced_summary(rounds, args.other_max)


def _bootstrap(
    pairs: list[tuple[list[float], list[float]]], runs: int = 1000
) -> tuple[float, float]:
    """95% interval of the pooled p99 ratio loaded/quiet, resampling pairs of slices."""
    rng = random.Random(13)
    ratios = []
    for _ in range(runs):
        pick = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        quiet = [x for q, _ in pick for x in q]
        loaded = [x for _, lo in pick for x in lo]
        if quiet and loaded:
            ratios.append(_percentiles(loaded)["p99_ms"] / _percentiles(quiet)["p99_ms"])
    ratios.sort()
    return ratios[int(len(ratios) * 0.025)], ratios[int(len(ratios) * 0.975) - 1]


def _sliced_summary(rounds: list[Sliced], other_max: float) -> None:
    if not rounds:
        print("no complete round: nothing to summarise")
        return
    clean = [m for m in rounds if m.whole.other_cores <= other_max]
    print(
        f"summary (p99 ratio loaded/quiet slices, target <= 1.10); clean rounds (the rest of "
        f"the machine <= {other_max:.2f} cores): {len(clean)} of {len(rounds)}"
    )
    for label, rows in (("all", rounds), ("clean", clean)):
        if not rows:
            continue
        ratios = [
            _percentiles(m.kind("loaded"))["p99_ms"] / _percentiles(m.kind("quiet"))["p99_ms"]
            for m in rows
        ]
        quiet = _percentiles([x for m in rows for x in m.kind("quiet")])
        loaded = _percentiles([x for m in rows for x in m.kind("loaded")])
        low, high = _bootstrap([pair for m in rows for pair in m.pairs()])
        print(
            f"  {label}: per round {_spread(ratios).replace('pairs', 'rounds')}; pooled p99 "
            f"{loaded['p99_ms']:.1f} vs quiet {quiet['p99_ms']:.1f} ms, ratio "
            f"{loaded['p99_ms'] / quiet['p99_ms']:.2f} (95% bootstrap over slice pairs "
            f"{low:.2f} to {high:.2f}); p50 {loaded['p50_ms']:.1f} vs {quiet['p50_ms']:.1f} ms"
        )
    cpu = {role: statistics.mean(m.whole.cpu[role] for m in rounds) for role in ROLES}
    print("  mean CPU s per round: " + " ".join(f"{r} {v:.1f}" for r, v in cpu.items()))


def _round(
    args: argparse.Namespace, tmp: Path, n: int, order: list[str], extra: dict[str, str]
) -> dict[str, Trial]:
    """One round of separate trials: the warm-up, then the trials of ``order``."""
    base_nice = 0 if args.nice is not None else None

    def measure(bench: Bench) -> dict[str, Trial]:
        row = {}
        for i, kind in enumerate(order):
            nice = args.nice if kind not in ("quiet", "loaded") else base_nice
            row[kind] = bench.trial(kind, 100 * i + n, nice)
        return row

    return _fresh(args, tmp, n, extra, measure, base_nice)


def _fresh(
    args: argparse.Namespace,
    tmp: Path,
    n: int,
    extra: dict[str, str],
    measure: Callable[[Bench], T],
    base_nice: int | None = None,
) -> T:
    """``measure`` on a broker and worker of their own: history loaded and in the view,
    a warm-up trial (not counted) first."""
    tmp.mkdir(parents=True)
    with EmbeddedBroker() as broker:
        settings = _settings(broker.bootstrap, tmp, web_port=free_port())
        asyncio.run(create_topics(settings))
        proc = _worker(settings, tmp / "worker.log", extra)
        try:
            _wait_ready(_http_ready(settings.web_port), proc)
            print(f"round {n + 1}: publishing {args.history:,} completions of history", flush=True)
            began = time.monotonic()
            asyncio.run(
                _publish(
                    broker.bootstrap, settings.topic_chunks, _history(0, args.history, args.history)
                )
            )
            _wait_history(settings.usage_port, args.history, proc)
            print(
                f"round {n + 1}: history stitched and in the usage view after "
                f"{time.monotonic() - began:.0f} s",
                flush=True,
            )
            assert broker._proc is not None
            pids = {"worker": proc.pid, "usage": _usage_pid(proc.pid), "broker": broker._proc.pid}
            bench = Bench(args, settings, pids)
            warm = bench.trial("quiet", 999, base_nice, seconds=args.warmup)
            print(
                f"round {n + 1}: warm-up (not counted): p99 {warm.p['p99_ms']:.1f} ms", flush=True
            )
            return measure(bench)
        finally:
            _stop(proc)


def _wait_history(port: int, completions: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the usage view counts every completion of the history (180 s at most)."""
    url = f"http://127.0.0.1:{port}/usage?window=1d&by=tenant&limit=10000"
    counted = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                rows = json.loads(r.read())["rows"]
            counted = sum(row["totals"]["requests"] for row in rows)
        except (OSError, ValueError):
            pass
        if counted >= completions:
            return
        time.sleep(1)
    raise RuntimeError(
        f"the usage view counted {counted:,} of {completions:,} history completions after "
        "180 s: the worker is behind or not folding usage; see its log"
    )


def _summary(rounds: list[dict[str, Trial]], kinds: list[str], other_max: float) -> None:
    """Ratios over every round, then over the clean ones (nothing else on the machine
    used more than ``other_max`` cores during any of their trials), and pooled."""
    if not rounds:
        print("no complete round: nothing to summarise")
        return
    clean = [r for r in rounds if all(t.other_cores <= other_max for t in r.values())]
    print(
        f"summary (p99 ratio loaded/quiet, target <= 1.10); clean rounds (the rest of the "
        f"machine <= {other_max:.2f} cores in each trial): {len(clean)} of {len(rounds)}"
    )
    for kind in kinds:
        for label, rows in (("all", rounds), ("clean", clean)):
            if not rows:
                continue
            ratios = [r[kind].p["p99_ms"] / r["quiet"].p["p99_ms"] for r in rows]
            loaded = _pooled([r[kind] for r in rows])
            quiet = _pooled([r["quiet"] for r in rows])
            print(
                f"  {kind} ({label}): {_spread(ratios)}; pooled p99 {loaded:.1f} vs quiet "
                f"{quiet:.1f} ms, ratio {loaded / quiet:.2f}"
            )
        cpu = {role: statistics.mean(r[kind].cpu[role] for r in rounds) for role in ROLES}
        print(f"  {kind}: mean CPU s " + " ".join(f"{r} {v:.1f}" for r, v in cpu.items()))
    qcpu = {role: statistics.mean(r["quiet"].cpu[role] for r in rounds) for role in ROLES}
    qp99 = [r["quiet"].p["p99_ms"] for r in rounds]
    print(
        f"  quiet: p99 {min(qp99):.1f}..{max(qp99):.1f} ms; mean CPU s "
        + " ".join(f"{r} {v:.1f}" for r, v in qcpu.items())
    )
