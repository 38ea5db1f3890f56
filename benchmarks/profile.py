"""Where the worker's CPU goes under the e2e benchmark's load: a py-spy profile, broken down.

Starts an embedded broker, preloads the e2e benchmark's workload (sequenced 20-chunk text
streams with end markers, about 50 live at a time), starts the worker of this checkout
(``python -m processor worker``), and once it is ready attaches py-spy (``record --native
--threads --format raw``) until the last response has arrived. Each sample is then given to
one bucket: walking from the innermost frame outwards, the first frame that belongs to a
bucket's code decides (so pydantic validation called by the core counts as core, json
called by aiokafka as aiokafka, a C-level asyncio task step as the asyncio loop); any
stack with the interpreter's collector in it (``gc_collect_main``) is GC. py-spy drops idle
threads, but with native frames it counts a thread blocked on the GIL or in epoll_wait as
running: those samples are set apart, so the shares are shares of CPU (a thread that is
runnable but not scheduled is still sampled: on a contended machine the samples add up to
more than the CPU time, which is printed as the coverage). The us/record column is each
share times the CPU per record measured from /proc. GC is also measured without the
sampler: the worker runs under a small wrapper that times every collection (gc.callbacks).

    ./dev bench profile [--streams 2000] [--rate 100] [--set CHUNKSTITCH_X=1 ...]

Needs ptrace rights on the worker (root, or kernel.yama.ptrace_scope=0). The raw samples
are kept (path printed) for a flame graph (flamegraph.pl) or a closer look.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.e2e import (
    _count_until,
    _cpu_s,
    _http_ready,
    _preload,
    _records,
    _settings,
    _stop,
    _wait_ready,
)
from processor.admin import create_topics
from processor.broker import EmbeddedBroker, free_port

ROOT = str(Path(__file__).resolve().parents[1])

BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("chunkstitch core (parse, assemble, detect)", (f"{ROOT}/processor/core/",)),
    ("stitcher (processor/worker/_stitcher.py)", (f"{ROOT}/processor/worker/_stitcher.py",)),
    ("usage rollups (processor/usage)", (f"{ROOT}/processor/usage",)),
    ("topics (headers, schemas)", (f"{ROOT}/topics/",)),
    (
        "batch ingestion, faust glue (processor/worker/_faust.py)",
        (f"{ROOT}/processor/worker/_faust",),
    ),
    ("chunkstitch shell (agent loop, ledger, metrics, kafka)", (f"{ROOT}/processor/",)),
    ("logging (structlog, logging)", ("/structlog/", "/logging/")),
    ("faust + mode (per-event machinery)", ("/site-packages/faust/", "/site-packages/mode/")),
    ("aiokafka (client, protocol)", ("/site-packages/aiokafka/", "/site-packages/kafka/")),
    ("asyncio loop", ("/asyncio/", "_asynciomodule.c", "/selectors.py")),
]
"""(bucket, path fragments) in the order they are tried on each frame."""

GC = "garbage collection"
SYSCALL = "socket syscalls (kernel send/recv)"
OTHER = "other"
WAIT = "waiting (GIL, epoll, locks, sleep): not CPU"
_WAITS = (
    "pthread_cond_timedwait",
    "pthread_cond_wait",
    "take_gil",
    "epoll_wait",
    "select_epoll",
    "clock_nanosleep",
    "time_sleep",
    "PyThread_acquire_lock_timed",  # threading.Lock / Event.wait in another thread
    "sem_wait",
    "sem_timedwait",
    "sem_clockwait",
)
_SYSCALLS = ("send ", "sendto ", "sendmsg ", "recv ", "recvfrom ", "recvmsg ", "write ", "read ")

GC_WRAPPER = """
import gc, os, sys, threading, time
out, state = sys.argv[1], [0.0, 0, 0.0]
def on_gc(phase, info):  # runs in the collecting thread: its CPU time brackets the pause
    if phase == "start":
        state[2] = time.thread_time()
    else:
        state[0] += time.thread_time() - state[2]
        state[1] += 1
gc.callbacks.append(on_gc)
def dump():
    while True:
        time.sleep(0.2)
        with open(out + ".tmp", "w") as f:
            f.write(f"{state[0]} {state[1]}")
        os.replace(out + ".tmp", out)
threading.Thread(target=dump, daemon=True, name="gc-dump").start()
sys.argv = ["chunkstitch", "worker"]
from processor.cli import main
main()
"""
"""``python -m processor worker`` with the collector's own CPU time counted (gc.callbacks),
written to a file five times a second: GC measured without the sampler."""


def _frame_path(frame: str) -> str:
    """``func (path:line)`` -> ``path:line`` (the part py-spy puts in parentheses)."""
    start = frame.rfind(" (")
    return frame[start + 2 : -1] if start >= 0 and frame.endswith(")") else frame


def classify(frames: list[str]) -> tuple[str, str]:
    """(bucket, deciding frame) of one sample; ``frames`` run from the outermost inwards."""
    for frame in frames:
        if frame.startswith(("gc_collect", "collect_with_callback", "_PyGC_Collect")):
            return GC, frame
    # py-spy counts a thread blocked on the GIL (a condition variable) or in epoll_wait as
    # running when it samples native frames; neither is CPU, so they are set apart.
    for frame in frames:
        if frame.startswith(_WAITS):
            return WAIT, frame
    if frames and frames[-1].startswith(_SYSCALLS):
        return SYSCALL, frames[-1]
    for frame in reversed(frames):
        path = _frame_path(frame)
        for bucket, fragments in BUCKETS:
            if any(f in path for f in fragments):
                return bucket, frame
    return OTHER, frames[-1] if frames else "?"


def breakdown(
    raw: Path,
) -> tuple[dict[str, collections.Counter[str]], dict[str, collections.Counter[str]]]:
    """Samples per thread and bucket, and per bucket the deciding frames (py-spy raw)."""
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    detail: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "all"
        if frames and frames[0].startswith("thread ("):
            thread = frames[0].split(": ", 1)[-1]
            frames = frames[1:]
            if thread == "gc-dump":
                continue  # the GC figure's own writer, not the worker
        bucket, frame = classify(frames)
        per_thread[thread][bucket] += int(count)
        detail[bucket][frame] += int(count)
    return per_thread, detail


def _gc_seconds(path: Path) -> tuple[float, int]:
    try:
        seconds, count = path.read_text().split()
        return float(seconds), int(count)
    except (OSError, ValueError):
        return 0.0, 0


def profile(
    streams: int,
    rate: int,
    native: bool,
    nonblocking: bool,
    extra_env: dict[str, str],
    tmp: Path,
) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: install the dev extras (./dev install) or pip it")
    records = _records(streams, 20, seed=1)
    raw = tmp / "profile.raw.txt"
    with EmbeddedBroker() as broker:
        settings = _settings(broker.bootstrap, tmp, web_port=free_port())
        asyncio.run(create_topics(settings))
        asyncio.run(_preload(broker.bootstrap, settings.topic_chunks, records))
        gc_file = tmp / "gc.txt"
        log = (tmp / "worker.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", GC_WRAPPER, str(gc_file)],
            env={**os.environ, **settings.to_env(), **extra_env},
            stdout=log,
            stderr=log,
        )
        t0 = _wait_ready(_http_ready(settings.web_port), proc)
        gc0 = _gc_seconds(gc_file)
        cmd = [spy, "record", "--pid", str(proc.pid), "--format", "raw", "--output", str(raw)]
        cmd += ["--threads", "--full-filenames", "--rate", str(rate)]
        if native:
            cmd.append("--native")
        if nonblocking:
            cmd.append("--nonblocking")
        sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cpu0 = _cpu_s(proc.pid)
        try:
            _, t1 = asyncio.run(
                _count_until(broker.bootstrap, settings.topic_responses, streams, timeout_s=900)
            )
            cpu1 = _cpu_s(proc.pid)
            time.sleep(0.3)
            gc1 = _gc_seconds(gc_file)
        finally:
            sampler.send_signal(signal.SIGINT)
            try:
                _, err = sampler.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
            _stop(proc)
    if sampler.returncode != 0 or not raw.exists():
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(
            f"py-spy could not sample the worker ({tail[0]}); it needs ptrace rights: run as "
            "root or set kernel.yama.ptrace_scope=0"
        )
    n = len(records)
    per_thread, detail = breakdown(raw)
    buckets: collections.Counter[str] = collections.Counter()
    for counts in per_thread.values():
        buckets.update(counts)
    waiting = buckets.pop(WAIT, 0)
    total = sum(buckets.values())
    cpu = cpu1 - cpu0
    gc_s, gc_n = gc1[0] - gc0[0], gc1[1] - gc0[1]
    mode = ("native" if native else "Python frames") + (", nonblocking" if nonblocking else "")
    print(
        f"worker under py-spy ({rate} Hz, {mode}): {n:,} records in {t1 - t0:.1f} s = "
        f"{n / (t1 - t0):,.0f} records/s (slowed by the sampler), {cpu:.1f} s CPU (/proc) = "
        f"{cpu / n * 1e6:.0f} us/record"
    )
    print(
        f"{total:,} samples on a CPU or runnable = {total / rate:.1f} s "
        f"({total / rate / cpu * 100:.0f}% of the CPU time: above 100% when the machine is "
        f"contended, a runnable thread is sampled too); {waiting:,} samples waiting for the "
        "GIL, in epoll, on a lock or asleep left out"
    )
    print(
        f"garbage collection by gc.callbacks (no sampler): {gc_n:,} collections, "
        f"{gc_s:.2f} s CPU = {gc_s / cpu * 100:.1f}% of the worker's CPU"
    )
    threads = sorted(per_thread, key=lambda t: -sum(per_thread[t].values()))
    for bucket in [b for b, _ in BUCKETS] + [GC, SYSCALL, OTHER]:
        buckets.setdefault(bucket, 0)
    head = " | ".join(f"{t} %" for t in threads)
    print(f"\n| where | % of CPU samples | us/record | {head} |")
    print("|---|---:|---:|" + "---:|" * len(threads))
    for bucket, count in buckets.most_common():
        share = count / total
        cols = " | ".join(f"{per_thread[t][bucket] / total * 100:.1f}" for t in threads)
        print(f"| {bucket} | {share * 100:.1f}% | {share * cpu / n * 1e6:.0f} | {cols} |")
    print("(us/record: the share times the measured CPU per record)")
    print("\ntop deciding frames per bucket:")
    for bucket, count in buckets.most_common():
        if not count:
            continue
        print(f"  {bucket} ({count:,} samples)")
        for frame, c in detail[bucket].most_common(5):
            print(f"    {c / total * 100:5.1f}%  {_short(frame)}")
    print(f"\nraw samples: {raw}")


def _short(frame: str) -> str:
    return frame.replace(ROOT + "/", "").replace(sys.prefix + "/lib/", "")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks profile", description=__doc__)
    parser.add_argument("--streams", type=int, default=2000, help="streams of 20 chunks")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--no-native", action="store_true", help="Python frames only (GC not sampled then)"
    )
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="do not pause the worker per sample (less slowdown; implies --no-native)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the worker (e.g. CHUNKSTITCH_BATCH_MAX=1000); repeatable",
    )
    args = parser.parse_args(argv)
    extra: dict[str, str] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set wants NAME=VALUE, got {item!r}")
        extra[name] = value
    tmp = Path(tempfile.mkdtemp(prefix="chunkstitch-profile-"))
    started = time.monotonic()
    native = not (args.no_native or args.nonblocking)
    profile(args.streams, args.rate, native, args.nonblocking, extra, tmp)
    print(f"(whole run {time.monotonic() - started:.0f} s)")
