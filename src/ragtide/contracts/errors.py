"""The small error hierarchy; `ragtide.embedder.worker` is the one place that decides retry vs dead-letter."""


class RagtideError(Exception):
    """Base of every error ragtide raises on purpose."""


class ConfigError(RagtideError):
    """A configuration mistake; the message names the field."""


class DecodeError(RagtideError):
    """A Kafka record that is not a Debezium change event we can read (goes to the dead-letter topic)."""


class StoreUnavailable(RagtideError):
    """A store the writer needs (the vector index, or Postgres for the truncate log) is unreachable; the batch is
    retried, offsets are not committed."""


class StackError(RagtideError):
    """A native stack process (Postgres, Kafka, Connect, node) failed to start or answer."""
