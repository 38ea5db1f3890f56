"""chunkstitch: reassemble streamed LLM chat.completion.chunk records on Kafka."""

__version__ = "0.1.0"

__all__ = ["__version__"]
