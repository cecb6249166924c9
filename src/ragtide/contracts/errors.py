"""The small error hierarchy; `ragtide.embedder.worker` is the one place that decides retry vs dead-letter.

Each backend maps the errors that mean "unavailable right now" onto `StoreUnavailable` where it calls its client
(the index backends in `embedder/index/`, Postgres in `contracts/pg.py`); nothing else is retried. `ClientError` is
the one error an HTTP caller is told to fix (422): every other exception is ours, a 5xx that alerts.
"""


class RagtideError(Exception):
    """Base of every error ragtide raises on purpose."""


class ConfigError(RagtideError):
    """A configuration mistake; the message names the field."""


class DecodeError(RagtideError):
    """A Kafka record that is not a Debezium change event we can read (goes to the dead-letter topic)."""


class StoreUnavailable(RagtideError):
    """A store (the vector index: a Qdrant server unreachable or the embedded index's disk full; or Postgres) cannot
    serve right now. The embedder retries the batch and commits nothing; the gateway falls back to what the process
    knows; an HTTP request gets a 503 with `Retry-After: retry_after_s`. The message says which store and why."""

    retry_after_s = 5


class ProviderUnavailable(StoreUnavailable):
    """The embeddings provider (`encoder.backend: openai`) cannot embed right now: unreachable, timing out,
    rate-limiting past its retries, failing, refusing the key, or answering with fewer vectors than texts. An
    outage like a store's: the batch is retried, never dead-lettered; a query gets a 503 with Retry-After."""


class ClientError(RagtideError):
    """A request the caller must fix (HTTP 422); the message says what and how."""


class StackError(RagtideError):
    """A native stack process (Postgres, Kafka, Connect, node) failed to start or answer."""


class SourceNotReady(RagtideError):
    """The source database fails a `ragtide doctor` check; the message is the report, each failure with its fix."""
