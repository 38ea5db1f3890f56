"""Run the worker in the foreground (``chunkstitch worker``)."""

from __future__ import annotations

from processor.logs import configure_logging, get_logger, logging_dict_config
from processor.settings import Settings

__all__ = ["run_worker"]


def run_worker(settings: Settings) -> None:
    """Start the faust worker and block until SIGINT/SIGTERM (clean shutdown)."""
    import faust

    from processor.worker._app import create_app

    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("chunkstitch.worker")
    app = create_app(settings)
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
    worker.execute_from_commandline()
