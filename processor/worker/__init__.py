"""The chunkstitch worker: a faust-streaming app around the functional core."""

from processor.worker._app import PLUGINS, create_app
from processor.worker._run import run_worker
from processor.worker._stitcher import Record, Stitcher

__all__ = ["PLUGINS", "Record", "Stitcher", "create_app", "run_worker"]
