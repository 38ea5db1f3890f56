"""The one logging setup of chunkstitch: structlog on stderr; readable console lines on a
terminal, JSON lines otherwise (``CHUNKSTITCH_LOG_FORMAT=auto``, the default; ``json`` or
``console`` force one).

Library code calls ``structlog.get_logger(__name__)`` and binds context
(``completion_id``, ``partition``, ``offset``). Stdlib loggers (faust, mode, aiokafka)
are routed through structlog's ``ProcessorFormatter`` so every line has one shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger", "logging_dict_config", "resolve_format"]

_configured = False


def _shared() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def resolve_format(fmt: str) -> str:
    """``auto`` -> ``console`` when stderr is a terminal, else ``json``; others unchanged."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def _formatter(fmt: str) -> structlog.stdlib.ProcessorFormatter:
    fmt = resolve_format(fmt)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def _configure_structlog() -> None:
    structlog.configure(
        processors=[*_shared(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def logging_dict_config(level: str = "INFO", fmt: str = "auto") -> dict[str, Any]:
    """The same setup as a ``logging.config.dictConfig`` dict, for runners that take one
    (faust's worker installs its logging from it, so faust/mode/aiokafka logs go through
    structlog too)."""
    _configure_structlog()
    quiet = max(logging.getLevelName(level), logging.WARNING)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structlog": {"()": lambda: _formatter(fmt)}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"level": logging.getLevelName(quiet)}
            for name in ("aiokafka", "kafka", "faust", "mode")
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "auto", *, force: bool = False) -> None:
    """Configure structlog and route stdlib logging through it (idempotent)."""
    global _configured
    if _configured and not force:
        return
    _configure_structlog()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty third-party loggers: keep warnings and errors, drop per-message info.
    for name in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))
    _configured = True


def get_logger(name: str | None = None, **bound: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger, optionally with context bound."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger.bind(**bound) if bound else logger
