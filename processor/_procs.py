"""Stopping a child process: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace_s: float = 5.0) -> None:
    """Ask ``proc`` to stop and wait ``grace_s``; kill it if it has not stopped by then."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)
