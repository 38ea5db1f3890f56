"""Dispatch: ``python -m benchmarks <name> [args...]``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "broker": "benchmarks.broker",
    "core": "benchmarks.core",
    "e2e": "benchmarks.e2e",
    "profile": "benchmarks.profile",
    "publisher": "benchmarks.publisher",
    "ledger_load": "benchmarks.ledger_load",
    "restart": "benchmarks.restart",
    "soak": "benchmarks.soak",
    "usage_read": "benchmarks.usage_read",
    "sink": "benchmarks.sink",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m benchmarks <name> [args...]; names: {names}", file=sys.stderr)
        raise SystemExit(2)
    name = sys.argv[1]
    module = importlib.import_module(BENCHMARKS[name])
    module.main(sys.argv[2:])


main()
