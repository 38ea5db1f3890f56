"""Runnable examples of chunkstitch's client libraries."""
