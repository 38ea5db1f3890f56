"""`chunkstitch demo`, the README's first command, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "processor", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)},
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "40 of 40 completions finished: 37 complete, 1 error, 2 incomplete" in out
    assert "duplicate chunks dropped: 1" in out
    assert "dead letters: 1" in out
    assert "not_json" in out
    assert "broker and worker stopped" in out
    assert not list(tmp_path.glob("chunkstitch-demo-*"))  # its temporary folder is gone
