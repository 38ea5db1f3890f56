"""chunkstitch topics: the single source of truth for topic names, configs, record
contract and message schemas. Imports no Kafka client.
"""

from topics._headers import (
    HEADER_END,
    HEADER_END_REASON,
    HEADER_PROVIDER,
    HEADER_REROUTED,
    HEADER_SEQ,
    HEADER_STARTED_AT,
    HEADER_TENANT,
    EndReason,
    HeaderError,
    RecordMeta,
    decode_headers,
    encode_headers,
)

__all__ = [
    "HEADER_END",
    "HEADER_END_REASON",
    "HEADER_PROVIDER",
    "HEADER_REROUTED",
    "HEADER_SEQ",
    "HEADER_STARTED_AT",
    "HEADER_TENANT",
    "EndReason",
    "HeaderError",
    "RecordMeta",
    "decode_headers",
    "encode_headers",
]
