"""A real PostgreSQL server for the usage-sink tests (never a mock).

* :func:`server_dsn`: the server named by ``CHUNKSTITCH_TEST_POSTGRES_DSN`` (``.ci/run``
  starts one and exports it; locally: ``eval "$(sudo .ci/postgres.sh)"`` or point it at any
  server where the role may create databases). Without it the tests skip and say how, and
  with ``CI=true`` they fail instead.
* :func:`fresh_database`: a database of its own per test, dropped afterwards.
* :class:`ThrowawayCluster`: a private cluster (initdb) on a free port of 127.0.0.1 that a
  test may stop and start (the database restarted mid-run) without touching anyone else's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from processor.broker import free_port

ENV = "CHUNKSTITCH_TEST_POSTGRES_DSN"
HOW = (
    f"set {ENV}=postgresql://USER:PASSWORD@127.0.0.1:5432/DB (a role that may CREATE DATABASE), "
    'or as root run: eval "$(.ci/postgres.sh)" (installs and starts PostgreSQL on 127.0.0.1)'
)


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests must run in CI: {reason}; {HOW}")
    pytest.skip(f"PostgreSQL tests need a server: {reason}; {HOW}")


def server_dsn() -> str:
    dsn = os.environ.get(ENV, "")
    if not dsn:
        _missing(f"{ENV} is not set")
    return dsn


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@asynccontextmanager
async def fresh_database(dsn: str) -> AsyncIterator[str]:
    """A new, empty database on the server of ``dsn``; yields its DSN."""
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"{ENV} is set but the server does not answer ({exc}); {HOW}")
    name = f"cs_test_{uuid.uuid4().hex[:10]}"
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield with_database(dsn, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class ThrowawayCluster:
    """A private PostgreSQL cluster in a temporary directory, trust auth on 127.0.0.1."""

    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cs-pg-")))

    def _run(self, *argv: str) -> None:
        bindir = _bindir()
        assert bindir is not None
        cmd = [str(bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {proc.stdout}{proc.stderr}")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create(self) -> ThrowawayCluster:
        if _bindir() is None:
            _missing("no PostgreSQL server binaries (initdb) for a throwaway cluster")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> ThrowawayCluster:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start"
        )
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
