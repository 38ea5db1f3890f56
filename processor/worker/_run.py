"""Run the worker in the foreground (``chunkstitch worker``).

Before faust starts, the web port and the broker are checked, so that the usual first
mistakes (no broker, a wrong address, a port taken by another worker) end in one log line
that says what to do and exit code 2, not a traceback from inside faust. The worker logs
one ``worker ready`` line (partitions, web address) when its first assignment is
complete, and one ``worker stopped`` line with its exit code.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from processor.logs import configure_logging, get_logger, logging_dict_config
from processor.settings import Settings

__all__ = ["EXIT_CONFIG", "preflight", "run_worker"]

EXIT_CONFIG = 2
"""Exit code of a worker that cannot start because of its configuration or environment."""

log = get_logger("chunkstitch.worker")


def _web_problem(settings: Settings, port: int | None = None, *, usage: bool = False) -> str | None:
    """Why a web server could not listen on ``web_host:port`` (the worker's web port, or
    with ``usage`` the ``/usage`` port), or None."""
    port = settings.web_port if port is None else port
    what, flag = (
        ("usage port", "--usage-port N or CHUNKSTITCH_USAGE_PORT=N")
        if usage
        else ("web port", "--web-port N or CHUNKSTITCH_WEB_PORT=N")
    )
    where = f"{settings.web_host}:{port}"
    try:
        infos = socket.getaddrinfo(
            settings.web_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return (
            f"cannot listen on {where}: unknown host {settings.web_host!r}; set "
            "CHUNKSTITCH_WEB_HOST to an address of this machine (127.0.0.1, 0.0.0.0)"
        )
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"{what} {port} on {settings.web_host} is already in use "
                    f"(another worker?); pick a free one with {flag}"
                )
            return (
                f"cannot listen on {where} ({exc.strerror}); pick another address or port "
                f"with CHUNKSTITCH_WEB_HOST / {flag}"
            )
    return None


def preflight(settings: Settings) -> str | None:
    """The first reason the worker cannot start (one line, with what to do), or None."""
    from processor.kafka import probe_broker

    problem = _web_problem(settings)
    if problem is None and settings.usage_enabled:
        if settings.usage_port == settings.web_port:
            return (
                f"CHUNKSTITCH_USAGE_PORT is the web port ({settings.web_port}); /usage has a "
                "server of its own: give it another port"
            )
        problem = _web_problem(settings, settings.usage_port, usage=True)
    if problem:
        return problem
    unreachable = asyncio.run(probe_broker(settings))
    return str(unreachable) if unreachable else None


def _announce_ready(app: Any, settings: Settings) -> None:
    """Log ``worker ready`` once, when the first rebalance is complete."""
    done = {"ready": False}

    @app.on_rebalance_complete.connect  # type: ignore[untyped-decorator,unused-ignore]
    async def _ready(sender: Any, **kwargs: Any) -> None:
        if done["ready"]:
            return
        done["ready"] = True
        try:
            assignment = app.consumer.assignment()
        except Exception:  # the consumer is gone already (stopping)
            assignment = set()
        log.info(
            "worker ready",
            partitions=sorted(
                tp.partition for tp in assignment if tp.topic == settings.topic_chunks
            ),
            topic=settings.topic_chunks,
            web=f"http://{settings.web_host}:{settings.web_port}",
            usage=f"http://{settings.web_host}:{settings.usage_port}/usage"
            if settings.usage_enabled
            else None,
            broker=settings.broker,
        )


def run_worker(settings: Settings) -> None:
    """Start the faust worker and block until SIGINT/SIGTERM (clean shutdown)."""
    configure_logging(settings.log_level, settings.log_format)
    problem = preflight(settings)
    if problem:
        log.error(f"worker cannot start: {problem}")
        raise SystemExit(EXIT_CONFIG)

    import faust

    from processor import pricing
    from processor.worker._app import create_app

    pricing.preload()  # the price data, meanwhile (the first completion would wait for it)

    app = create_app(settings)
    _announce_ready(app, settings)
    log.info(
        "worker starting",
        broker=settings.broker,
        topic=settings.topic_chunks,
        web=f"http://{settings.web_host}:{settings.web_port}",
    )
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_dict_config(settings.log_level, settings.log_format),
        redirect_stdouts=False,
        quiet=True,
    )
    worker.spinner = None  # faust's spinner writes cursor codes to stdout, even into files
    code: int | str | None = 1
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        log.info("worker stopped", exit_code=code if code is not None else 0)
