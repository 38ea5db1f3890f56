"""Memory probe for benchmarks only (``./dev bench soak --memprofile DIR``).

The soak puts this directory first on ``PYTHONPATH`` and sets ``CS_MEMPROBE_DIR``, so
that every Python process it starts (the worker and its usage server child) imports this
module at start-up. In the worker and the usage server it starts a daemon thread that
starts :mod:`tracemalloc` (once the price tables are imported) and, whenever a request
file ``DIR/req-<name>`` appears, writes ``DIR/<name>-<role>-<pid>.txt``: RSS (anonymous
and file-backed), what tracemalloc traces, glibc's ``mallinfo2`` (heap in use / free:
fragmentation), the top allocation sites by file:line and by traceback, the gc-tracked
objects by type and the largest containers.
Nothing here is imported by ``processor``; without ``CS_MEMPROBE_DIR`` it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

_DIR = os.environ.get("CS_MEMPROBE_DIR")


def _role() -> str | None:
    # at start-up sys.argv of ``python -m processor worker`` is ["-m", "worker"] and of
    # ``python -m processor.usage`` (the usage server child) just ["-m"]
    argv = sys.argv
    if argv[:2] == ["-m", "worker"]:
        return "worker"
    if argv == ["-m"]:
        return "usage"
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {name: getattr(info, name) for name, _ in _MallInfo2._fields_}


def _status() -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            key, value = line.split(":", 1)
            out[key] = value.strip()
    return out


def _report(name: str, role: str) -> None:
    t0 = time.monotonic()
    lines = [f"# {role} pid {os.getpid()} at {time.strftime('%H:%M:%S')} request {name}"]
    lines.append(f"status: {_status()}")
    cur, peak = tracemalloc.get_traced_memory()
    lines.append(f"tracemalloc traced: {cur / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)")
    mi = _mallinfo()
    if mi:
        lines.append(
            "mallinfo2: heap (arena) {:.1f} MB, in use {:.1f} MB, free in heap {:.1f} MB, "
            "mmapped {:.1f} MB, trimmable top {:.1f} MB".format(
                mi["arena"] / 1e6,
                mi["uordblks"] / 1e6,
                mi["fordblks"] / 1e6,
                mi["hblkhd"] / 1e6,
                mi["keepcost"] / 1e6,
            )
        )
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    lines.append("\n## top 30 by file:line")
    for stat in snap.statistics("lineno")[:30]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:9d}  {stat.traceback[0]}")
    lines.append("\n## top 12 by traceback")
    for stat in snap.statistics("traceback")[:12]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:9d}")
        lines += [f"      {frame}" for frame in stat.traceback.format()[-12:]]
    del snap
    objs = gc.get_objects()
    by_type: Counter[str] = Counter(type(o).__qualname__ for o in objs)
    lines.append(f"\n## gc-tracked objects: {len(objs):,}; top 25 types")
    lines += [f"{n:10,d}  {t}" for t, n in by_type.most_common(25)]
    big: list[tuple[int, Any]] = []
    for o in objs:
        if isinstance(o, dict | list | set | frozenset) or type(o).__name__ == "deque":
            with contextlib.suppress(Exception):
                n = len(o)
                if n >= 5000:
                    big.append((n, o))
    big.sort(key=lambda x: -x[0])
    lines.append("\n## containers with >= 5000 items (largest 15), with a sample")
    for n, o in big[:15]:
        sample: Any = ""
        with contextlib.suppress(Exception):
            first = next(iter(o))
            sample = repr(first)[:100]
            if isinstance(o, dict):
                sample += " -> " + repr(o[first])[:100]
        owners = []
        for ref in gc.get_referrers(o):
            if ref is objs or ref is big:
                continue
            owners.append(type(ref).__qualname__)
            if isinstance(ref, dict):
                owners[-1] += (
                    "{" + ",".join(str(k) for k, v in list(ref.items())[:200] if v is o)[:60] + "}"
                )
            if len(owners) >= 3:
                break
        lines.append(f"{n:10,d}  {type(o).__qualname__}  owners={owners}  e.g. {sample}")
    del objs, big
    lines.append(f"\n(probe took {time.monotonic() - t0:.1f} s)")
    out = Path(_DIR or ".") / f"{name}-{role}-{os.getpid()}.txt"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out)


def _price_data_loaded() -> bool:
    module = sys.modules.get("genai_prices.data")
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _peak(role: str, cur: int) -> None:
    snap = tracemalloc.take_snapshot()
    lines = [
        f"# {role} pid {os.getpid()} at {time.strftime('%H:%M:%S')}: traced {cur / 1e6:.1f} MB"
    ]
    lines.append(f"status: {_status()}")
    for stat in snap.statistics("lineno")[:25]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:9d}  {stat.traceback[0]}")
    out = Path(_DIR or ".") / f"peak-{role}-{os.getpid()}-{int(cur / 1e6)}MB.txt"
    out.write_text("\n".join(lines) + "\n")


def _serve(role: str) -> None:
    assert _DIR is not None
    done: set[str] = set()
    started = time.time()
    # Importing the price tables (a very large Python module) under tracemalloc takes
    # minutes and stalls the worker: start tracing once they are loaded (or after 2 min).
    while not _price_data_loaded() and time.time() - started < 120:
        time.sleep(0.2)
    tracemalloc.start(int(os.environ.get("CS_MEMPROBE_FRAMES", "1")))
    reported = 80e6
    peaks = 0
    while True:
        time.sleep(0.25)
        cur, _ = tracemalloc.get_traced_memory()
        if cur > reported * 1.25 and peaks < 6:
            # a new high of what Python holds: where it is (catch-up peaks are transient)
            reported, peaks = cur, peaks + 1
            with contextlib.suppress(Exception):
                _peak(role, cur)
        with contextlib.suppress(OSError):
            for req in Path(_DIR).glob("req-*"):
                if req.name in done or req.stat().st_mtime < started:
                    continue
                done.add(req.name)
                try:
                    _report(req.name[4:], role)
                except Exception as exc:  # a probe never takes the process down
                    with contextlib.suppress(OSError):
                        (Path(_DIR) / f"{req.name[4:]}-{role}-{os.getpid()}.err").write_text(
                            repr(exc)
                        )


def _install() -> None:
    role = _role()
    if not _DIR or role is None:
        return
    threading.Thread(target=_serve, args=(role,), name="memprobe", daemon=True).start()


_install()
