"""GET /usage behind a bearer token on a real worker; probes and metrics stay open."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers.worker import WorkerProcess, isolated_settings, make_topics

TOKEN = "cs-test-token-7f3a9c"
WRONG = "cs-wrong-token-41b2"


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_usage_needs_the_token_probes_do_not_and_it_is_never_logged(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, api_token=TOKEN)
    await make_topics(settings)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log).start()
    try:
        port, web = worker.usage_port, worker.web_port  # /usage has a server of its own
        assert _get(web, "/usage?window=1h")[0] == 404  # never on the worker's event loop
        status, body = _get(port, "/usage?window=1h")
        assert status == 401
        assert "Authorization: Bearer" in json.loads(body)["error"]
        assert _get(port, "/usage?window=1h", WRONG)[0] == 401
        status, body = _get(port, "/usage?window=1h", TOKEN)
        assert status == 200, body
        assert json.loads(body)["rows"] == []
        status, body = _get(port, "/usage?window=5m", TOKEN)  # the same validation
        assert status == 400
        assert "window='5m'" in json.loads(body)["error"]
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert _get(web, open_path)[0] == 200, open_path
    finally:
        worker.stop()
    text = log.read_text()
    assert "request refused: no bearer token" in text
    assert "request refused: wrong bearer token" in text
    assert TOKEN not in text
    assert WRONG not in text


def _kill_the_usage_server(worker: WorkerProcess) -> int:
    """SIGKILL the worker's one child (its usage server process); the worker's exit code."""
    import os
    import signal

    assert worker.proc is not None
    children = [
        c
        for task in Path(f"/proc/{worker.proc.pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    return worker.proc.wait(timeout=30)


async def test_the_usage_server_dying_stops_the_worker_loudly(broker: str, tmp_path: Path) -> None:
    import asyncio

    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log).start()
    try:
        assert await asyncio.to_thread(_kill_the_usage_server, worker) == 1
    finally:
        worker.stop()
    text = log.read_text()
    assert "usage server died; stopping the worker" in text
    assert "the usage server process" in text
