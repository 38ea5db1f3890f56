"""The one settings object of chunkstitch (env prefix ``CHUNKSTITCH_``).

Every process (worker, publisher, consumer, CLI, demo) builds its configuration from
:class:`Settings`; nothing else reads the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from topics import TopicNames

__all__ = ["Settings", "get_settings", "settings_error_message"]


class Settings(BaseSettings):
    """chunkstitch configuration, read from ``CHUNKSTITCH_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHUNKSTITCH_", extra="ignore")

    # --- broker connection -------------------------------------------------------------
    broker: str = Field(
        default="127.0.0.1:9092",
        description="Kafka bootstrap servers: 'host:port' or 'kafka://host:port', comma separated.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    # --- topics (names and partition counts; configs live in topics/) ------------------
    topic_chunks: str = "chunkstitch.chunks"
    topic_responses: str = "chunkstitch.responses"
    topic_rollups: str = "chunkstitch.usage-rollups"
    topic_deadletter: str = "chunkstitch.deadletter"
    topic_ledger: str = "chunkstitch.ledger"
    partitions: int = Field(default=6, ge=1, description="Partitions of the chunk topic.")
    replication_factor: int = Field(default=1, ge=1)

    # --- worker --------------------------------------------------------------------------
    app_id: str = "chunkstitch"
    web_port: int = Field(default=6066, ge=1, le=65535)
    web_host: str = "127.0.0.1"
    data_dir: str = ".chunkstitch"
    session_timeout_s: float = Field(
        default=6.0,
        gt=0,
        description="Consumer group session timeout (short on the embedded broker).",
    )
    heartbeat_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="Consumer group heartbeat interval. 0 (the default): a third of the "
        "membership lease (session_timeout_s x lease_fraction), at most 1 s. A heartbeat "
        "renews the lease, so an explicit value must be at most half of it.",
    )
    commit_interval_s: float = Field(default=1.0, gt=0)
    batch_max: int = Field(
        default=2000,
        ge=1,
        description="Most records in one fetch, i.e. one stitcher round (2000 measured "
        "~18% faster than 500 on the e2e benchmark; latency is unaffected: a round is "
        "whatever one fetch returned).",
    )

    fetch_ahead: bool = Field(
        default=True,
        description="Take the chunk topic's next fetches while a round runs (at most "
        "about batch_max records buffered), so records published during a long round go "
        "into the next one instead of waiting for aiokafka to fetch again after it.",
    )

    # --- completion detection ------------------------------------------------------------
    usage_grace_s: float = Field(
        default=2.0, ge=0, description="Wait for usage after all choices finished."
    )
    idle_timeout_s: float = Field(
        default=30.0, gt=0, description="Emit as incomplete after this idle time."
    )
    max_lifetime_s: float = Field(default=600.0, gt=0)
    max_chunks: int = Field(default=20_000, ge=1)
    max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_record_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_response_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="Largest response record; a larger one is emitted as an error without "
        "its message bodies (Kafka's default max.message.bytes is about 1 MB).",
    )
    emitted_memory_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long emitted completion ids are remembered (late chunks -> dead letters).",
    )
    fetch_max_wait_ms: int = Field(
        default=10,
        ge=1,
        description="Longest time the worker's fetch waits for records (faust hard-codes "
        "1500 ms). Kafka answers a waiting fetch as soon as records arrive, so there this "
        "only sets the idle poll rate (deploy/ uses 500); the embedded broker always waits "
        "it out, so there it bounds the latency it adds.",
    )
    tick_interval_s: float = Field(default=0.5, gt=0, description="Time-based detection period.")

    # --- fencing, stalls, batches (worker) -----------------------------------------------
    lease_fraction: float = Field(
        default=0.4,
        gt=0,
        le=0.9,
        description="The membership lease lasts this fraction of the session timeout from "
        "the last heartbeat the coordinator answered without error; outputs and time rules "
        "only while it is valid.",
    )
    stall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A worker that waits this long for the broker (acknowledgements, the "
        "group coordinator, a rebalance) or whose event loop does not run exits non-zero.",
    )
    producer_request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for one produce request of the worker (faust's default "
        "is 20 minutes).",
    )
    gc_gen0_threshold: int = Field(
        default=20_000,
        ge=100,
        description="Allocations between young-generation collections on the worker "
        "(CPython's default is 700: the batch path allocates that in a few records).",
    )
    malloc_trim_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between returns of the C heap's free pages to the system "
        "(glibc malloc_trim, in a thread); 0: never. Without it RSS stays at the high-water "
        "mark of the last catch-up.",
    )

    # --- static group membership (processor/worker/_faust.py) ---------------------
    group_instance_id: str | None = Field(
        default=None,
        description="Kafka group.instance.id of this worker ('{hostname}' is replaced by the "
        "host name); unique per worker, stable across its restarts (the pod name). Unset: "
        "dynamic membership. Leave unset on the embedded broker (its static groups never "
        "settle).",
    )
    group_leave_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait for LeaveGroup on a clean stop."
    )

    # --- publisher -------------------------------------------------------------------------
    producer_acks: Literal["all", "1", "0"] = "all"
    producer_linger_ms: int = Field(default=5, ge=0)
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    producer_buffer_max: int = Field(
        default=10_000, ge=1, description="Chunks buffered before send blocks."
    )
    producer_buffer_wait_s: float = Field(
        default=0.5, ge=0, description="Longest a send waits for room in a full buffer."
    )
    producer_request_timeout_ms: int = Field(default=10_000, ge=100)
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Publisher/consumer give up reaching the broker after this."
    )
    consumer_dedupe_window: int = Field(
        default=10_000, ge=0, description="Completion ids remembered to drop duplicates."
    )

    # --- usage rollups ---------------------------------------------------------------------
    usage_enabled: bool = Field(
        default=True, description="Run the usage-rollup agent in the worker."
    )
    rollup_late_grace_s: float = Field(default=300.0, ge=0)
    metrics_label_cap: int = Field(default=200, ge=1)
    usage_attributes: str = Field(
        default="",
        description="Allowlist of cs-attr-<name> headers carried into the responses and the "
        "rollups as dimensions, comma separated; 'name:cap' sets that attribute's cap "
        "(e.g. 'api_key,feature,env:20'). Others are dropped (counted).",
    )
    usage_max_users: int = Field(
        default=1000,
        ge=1,
        description="Distinct users per source partition and hour in the rollups (and per "
        "process in the Prometheus labels); more are counted as user 'other'.",
    )
    usage_max_attribute_values: int = Field(
        default=1000,
        ge=1,
        description="The same cap for each attribute (unless 'name:cap' in usage_attributes).",
    )
    # bounded usage state, checkpoints, retention and the read model (bounded-state issue)
    topic_rollups_hourly: str = Field(
        default="", description="1-hour rollups; empty: '<topic_rollups>-1h'."
    )
    topic_usage_checkpoints: str = Field(
        default="", description="Usage checkpoints; empty: '<topic_rollups>-checkpoints'."
    )
    rollup_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Publish changed rollups, close windows and checkpoint this often.",
    )
    usage_dedup_s: float = Field(
        default=600.0,
        ge=0,
        description="A completion id seen again within this time (of record timestamps) is "
        "not counted twice; re-read from the responses topic on recovery.",
    )
    usage_max_future_s: float = Field(
        default=3600.0,
        gt=0,
        description="An event time this far ahead of its record's timestamp (or before "
        "2000) is implausible: counted as a late increment, never moves stream time.",
    )
    usage_view_minutes_s: float = Field(
        default=6 * 3600.0, gt=0, description="The read model keeps 1-minute rows this long."
    )
    usage_view_hours_s: float = Field(
        default=35 * 86400.0,
        gt=0,
        description="The read model keeps 1-hour and 1-day rows this long (longer history: "
        "the PostgreSQL sink).",
    )
    usage_query_limit_max: int = Field(default=10_000, ge=1)
    usage_port: int = Field(
        default=6068,
        ge=1,
        le=65535,
        description="Port of GET /usage (on CHUNKSTITCH_WEB_HOST): its own server, off the "
        "worker's event loop; distinct ports for several workers on a host.",
    )
    usage_server: Literal["process", "thread"] = Field(
        default="process",
        description="Where /usage and the read model run: a child process of the worker "
        "(no share of its GIL) or a thread of it.",
    )
    usage_server_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of the usage server process (process mode): above 0 it "
        "yields the CPU to the stitcher when they share cores; /usage answers slower then.",
    )
    usage_cache_s: float = Field(
        default=1.0,
        ge=0,
        description="/usage reuses an encoded page for this long at most, and only while no "
        "rollup was applied to the read model since (256 pages, least recently used "
        "dropped); 0 turns the cache off.",
    )
    usage_view_wait_s: float = Field(
        default=10.0, ge=0, description="/usage waits this long for the read model to catch up."
    )
    usage_read_stall_s: float = Field(
        default=60.0, gt=0, description="A recovery read gives up after this long without progress."
    )
    usage_publish_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Rollups and checkpoints not acknowledged within this stop the worker "
        "(exit 1; it recovers from its last checkpoint).",
    )
    retention_chunks_s: float = Field(default=86400.0, gt=0)
    retention_responses_s: float = Field(default=7 * 86400.0, gt=0)
    retention_rollups_s: float = Field(default=2 * 86400.0, gt=0)
    retention_rollups_hourly_s: float = Field(default=35 * 86400.0, gt=0)
    retention_deadletter_s: float = Field(default=14 * 86400.0, gt=0)
    retention_ledger_s: float = Field(default=86400.0, gt=0)

    @field_validator("usage_attributes")
    @classmethod
    def _check_usage_attributes(cls, value: str) -> str:
        from topics._headers import check_attribute_name

        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            name, _, cap = entry.partition(":")
            problem = check_attribute_name(name.strip())
            if problem:
                raise ValueError(f"{problem} (in {entry!r})")
            if cap and (not cap.strip().isdigit() or int(cap) < 1):
                raise ValueError(f"{entry!r}: the cap after ':' must be a positive integer")
        return value

    @property
    def usage_attribute_caps(self) -> dict[str, int]:
        """The attribute allowlist: name -> cap of distinct values (see usage_attributes)."""
        caps: dict[str, int] = {}
        for entry in (e.strip() for e in self.usage_attributes.split(",")):
            if entry:
                name, _, cap = entry.partition(":")
                caps[name.strip()] = int(cap) if cap.strip() else self.usage_max_attribute_values
        return caps

    @property
    def rollups_hourly_topic(self) -> str:
        return self.topic_rollups_hourly or f"{self.topic_rollups}-1h"

    @property
    def usage_checkpoints_topic(self) -> str:
        return self.topic_usage_checkpoints or f"{self.topic_rollups}-checkpoints"

    # --- usage history in PostgreSQL, access control (issue 16: usage sink, web_auth) -----
    usage_dsn: SecretStr | None = Field(
        default=None,
        description="PostgreSQL DSN (postgresql://user:pw@host:5432/db) of the usage history: "
        "the usage sink writes it; /usage and `chunkstitch usage` read it when set.",
    )
    usage_sink_group: str = Field(
        default="chunkstitch-usage-sink", description="Consumer group of the usage sink."
    )
    usage_sink_port: int = Field(
        default=6067, description="Web port of the usage sink (/healthz, /readyz, /metrics)."
    )
    usage_sink_batch_max: int = Field(
        default=5000, ge=1, description="Most rollup records written in one transaction."
    )
    usage_sink_retry_max_s: float = Field(
        default=10.0, gt=0, description="Longest wait between retries while the database is away."
    )
    usage_live_retention_s: float = Field(
        default=2 * 86400,
        gt=0,
        description="How far back the live rollups answer; with CHUNKSTITCH_USAGE_DSN set, "
        "a usage query reaching further back (or with no start) is answered from PostgreSQL.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that GET /usage requires (none: /usage is open). "
        "/healthz, /readyz and /metrics stay open.",
    )

    # --- logging -------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="'auto': readable console lines on a terminal, JSON lines otherwise.",
    )

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        hosts = [h.strip().removeprefix("kafka://") for h in value.split(",") if h.strip()]
        if not hosts:
            raise ValueError("it is empty; use host:port, e.g. 127.0.0.1:9092")
        for host in hosts:
            _check_host_port(host, f"entry {host!r}: " if len(hosts) > 1 else "")
        return ",".join(hosts)

    @model_validator(mode="after")
    def _heartbeats_renew_the_lease(self) -> Settings:
        lease = self.session_timeout_s * self.lease_fraction
        if self.heartbeat_interval_s == 0:
            self.heartbeat_interval_s = round(min(1.0, lease / 3), 3)
        elif self.heartbeat_interval_s > lease / 2:
            raise ValueError(
                f"CHUNKSTITCH_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g}) must be at "
                f"most half the membership lease ({lease:g}s = CHUNKSTITCH_SESSION_TIMEOUT_S x "
                "CHUNKSTITCH_LEASE_FRACTION): slower heartbeats let the lease lapse between "
                "renewals and pause every output; lower it, or leave it unset (derived)"
            )
        return self

    @model_validator(mode="after")
    def _ledger_outlives_streams(self) -> Settings:
        if self.emitted_memory_s <= self.max_lifetime_s:
            raise ValueError(
                f"CHUNKSTITCH_EMITTED_MEMORY_S ({self.emitted_memory_s:g}) must be longer "
                f"than CHUNKSTITCH_MAX_LIFETIME_S ({self.max_lifetime_s:g}): a replay after a "
                "restart reaches back up to a stream's lifetime"
            )
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        """Bootstrap servers as aiokafka wants them."""
        return self.broker.split(",")

    def to_env(self) -> dict[str, str]:
        """These settings as ``CHUNKSTITCH_*`` variables, to start a child process (worker)
        with exactly this configuration. Secrets are included: never log the result."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"CHUNKSTITCH_{name.upper()}"] = str(value)
        return env

    def topic_names(self) -> TopicNames:
        """The configured topic names and partition count, for :func:`topics.topic_specs`."""
        return TopicNames(
            chunks=self.topic_chunks,
            responses=self.topic_responses,
            rollups=self.topic_rollups,
            deadletter=self.topic_deadletter,
            ledger=self.topic_ledger,
            partitions=self.partitions,
            rollups_hourly=self.rollups_hourly_topic,
            usage_checkpoints=self.usage_checkpoints_topic,
            chunks_retention_ms=int(self.retention_chunks_s * 1000),
            responses_retention_ms=int(self.retention_responses_s * 1000),
            rollups_retention_ms=int(self.retention_rollups_s * 1000),
            rollups_hourly_retention_ms=int(self.retention_rollups_hourly_s * 1000),
            deadletter_retention_ms=int(self.retention_deadletter_s * 1000),
            ledger_retention_ms=int(self.retention_ledger_s * 1000),
        )

    def kafka_kwargs(self) -> dict[str, object]:
        """Connection keyword arguments for aiokafka clients (bootstrap, SASL, TLS)."""
        kwargs: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        return kwargs

    @property
    def faust_broker(self) -> list[str]:
        """Bootstrap servers as faust wants them (``kafka://host:port``)."""
        return [f"kafka://{h}" for h in self.bootstrap_servers]


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def _check_host_port(entry: str, prefix: str = "") -> None:
    """``host:port`` (host a name, IPv4 address or ``[IPv6]``, port 1..65535) or ValueError."""
    host, sep, port = entry.rpartition(":")
    if not sep:
        raise ValueError(f"{prefix}no port; use host:port, e.g. {entry}:9092")
    if host.startswith("[") and host.endswith("]"):
        valid_host = len(host) > 2 and all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    else:
        valid_host = bool(_HOSTNAME.fullmatch(host))
    if not valid_host:
        raise ValueError(
            f"{prefix}{host!r} is not a host name or address; use host:port, e.g. "
            "127.0.0.1:9092 (IPv6 in brackets: [::1]:9092)"
        )
    if not port.isdigit():
        raise ValueError(f"{prefix}port {port!r} is not a number; use host:port, e.g. {host}:9092")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{prefix}port {port} is out of range; use a port from 1 to 65535")


def settings_error_message(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line for a bad setting: which variable (or CLI flag) was wrong and what to do.

    ``flags`` maps field names to the CLI flag that set them (``{"broker": "--broker"}``);
    other fields are named by their ``CHUNKSTITCH_*`` variable. Used by every command.
    """
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return f"invalid settings: {exc}"
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if not first["loc"]:  # a check across settings: its message names the variables
        return str(first["msg"]).removeprefix("Value error, ") + more
    field = str(first["loc"][0])
    if flags and field in flags:
        name = flags[field]
        shown = f"{name} {first.get('input')!r}"
    else:
        name = f"CHUNKSTITCH_{field.upper()}"
        shown = f"{name}={first.get('input')!r}"
    msg = str(first["msg"]).removeprefix("Value error, ").split(", unable to")[0]
    msg = msg[:1].lower() + msg[1:]
    info = Settings.model_fields.get(field)
    if first["type"] == "value_error":
        pass  # our own validators say what to do
    elif name.startswith("--"):
        msg += f"; pass a valid {name}"
    elif info is not None and info.default is not None:
        msg += f"; fix or unset {name} (default: {info.default})"
    else:
        msg += f"; fix or unset {name}"
    return f"{shown} is not valid: {msg}{more}"


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
