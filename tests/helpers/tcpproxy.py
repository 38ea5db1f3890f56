"""A small TCP proxy in front of the embedded broker, to inject network faults in tests.

Why a second broker
-------------------
Kafka clients use the bootstrap address only to ask for metadata; every later connection
goes to the address the broker *advertises*. The session broker of ``tests/conftest.py``
(``processor.broker.EmbeddedBroker``) advertises its own listener, so a worker given the
proxy as bootstrap would talk to the proxy once and then straight to the broker. For fault
tests, :class:`ProxiedBroker` starts a separate Tansu that listens on port B and
advertises port P, and a :class:`TcpProxy` listens on P and forwards to B. Every client,
whatever it bootstraps from, then reaches the broker only through the proxy.

Whose connections are faulted
-----------------------------
The test's own producer and readers go through the proxy too (the advertised address is
the proxy's). Faults apply only to the connections of the processes named with
:meth:`TcpProxy.target` (the workers' PIDs); the proxy finds the process that owns a
connection from ``/proc/net/tcp`` and ``/proc/<pid>/fd`` (Linux only). With no target
set, every connection is faulted.

Faults (callable from any thread; the proxy runs its own event loop in a thread)
--------------------------------------------------------------------------------
* :meth:`cut` resets (RST, ``SO_LINGER`` 0) every targeted connection now;
* :meth:`refuse` resets every new targeted connection as soon as it is accepted, for N s;
* :meth:`blackhole` keeps targeted connections open but swallows their bytes in both
  directions for N s (the broker and the client each wait for an answer that never
  comes; a request cut in the middle leaves a torn frame, which the side reading it sees
  as garbage once bytes flow again); new targeted connections are accepted and swallowed
  the same way. Afterwards bytes flow again on the same connections;
* :meth:`resume` ends a refusal or blackhole at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from processor.broker import BrokerError, broker_binary, free_port

__all__ = ["ProxiedBroker", "TcpProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """Inode of the IPv4 socket 127.0.0.1:local_port -> 127.0.0.1:remote_port."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1] == want_local and cols[2] == want_remote:
                return cols[9]
    return None


def _owner(inode: str, pids: Iterable[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return pid
    return None


class _Conn:
    def __init__(
        self,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        inode: str | None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.inode = inode
        """Inode of the client's end of the connection: who owns it is looked up when a
        fault is applied, so :meth:`TcpProxy.target` may name a process started later."""
        self.owner: tuple[frozenset[int], bool] | None = None

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()


class TcpProxy:
    """``127.0.0.1:listen_port`` -> ``127.0.0.1:upstream_port``, with fault controls."""

    def __init__(self, upstream_port: int, listen_port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = listen_port or free_port()
        self._pids: set[int] = set()
        self._conns: set[_Conn] = set()
        self._refuse_until = 0.0
        self._blackhole_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.resets = 0
        """Connections reset by :meth:`cut` or :meth:`refuse` (for the test's report)."""

    # -- controls (thread-safe) ------------------------------------------------------------
    def target(self, *pids: int) -> None:
        """Fault only the connections of these processes from now on (none: every one)."""
        self._pids = set(pids)

    def cut(self) -> int:
        """Reset every targeted connection now; returns how many were reset."""
        return self._call(self._cut)

    def refuse(self, seconds: float) -> None:
        """Cut now, and reset every new targeted connection for ``seconds``."""
        self._refuse_until = time.monotonic() + seconds
        self.cut()

    def blackhole(self, seconds: float) -> None:
        """Swallow every byte of targeted connections, both ways, for ``seconds``."""
        self._blackhole_until = time.monotonic() + seconds

    def resume(self) -> None:
        self._refuse_until = 0.0
        self._blackhole_until = 0.0

    @property
    def blackholed(self) -> bool:
        return time.monotonic() < self._blackhole_until

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
            )
            ready.set()
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()

            async def settle() -> None:
                await asyncio.gather(*tasks, return_exceptions=True)

            loop.run_until_complete(settle())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the test proxy did not listen on 127.0.0.1:{self.port}")
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.reset()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop -------------------------------------------------------------
    def _call(self, fn: Callable[[], int]) -> int:
        assert self._loop is not None, "the proxy is not started"

        async def run() -> int:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _targeted(self, conn: _Conn) -> bool:
        if not self._pids:
            return True
        pids = frozenset(self._pids)
        if conn.owner is None or conn.owner[0] != pids:
            found = conn.inode is not None and _owner(conn.inode, pids) is not None
            conn.owner = (pids, found)
        return conn.owner[1]

    def _cut(self) -> int:
        n = 0
        for conn in list(self._conns):
            if self._targeted(conn):
                conn.reset()
                self._conns.discard(conn)
                n += 1
        self.resets += n
        return n

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inode = _socket_inode(writer.get_extra_info("peername")[1], self.port)
        conn = _Conn(writer, writer, inode)
        if time.monotonic() < self._refuse_until and self._targeted(conn):
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()
            self.resets += 1
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        conn.upstream = up_writer
        self._conns.add(conn)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, conn), self._pump(up_reader, writer, conn)
            )
        finally:
            self._conns.discard(conn)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.blackholed and self._targeted(conn):
                    continue  # swallowed
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


class ProxiedBroker:
    """A Tansu broker on port B that advertises the port P of a :class:`TcpProxy` (P -> B).

    ``bootstrap`` is the proxy's address; every client reaches the broker through it.
    """

    def __init__(self, *, log_path: Path | None = None) -> None:
        self.broker_port = free_port()
        self.proxy = TcpProxy(self.broker_port)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def start(self, timeout_s: float = 10.0) -> ProxiedBroker:
        self.proxy.start()
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.broker_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.proxy.port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"the proxied test broker exited with {self._proc.returncode}")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.broker_port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the proxied test broker did not listen within {timeout_s}s")

    def stop(self) -> None:
        self.proxy.stop()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> ProxiedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
