"""Where the gateway keeps its state: API keys (hashed), tenant quotas, daily usage and the rate-limit buckets.

`GatewayStore` is the seam; `PostgresGatewayStore` keeps everything in the source database's
`ragtide_gateway` schema (outside Debezium's filtered publication), so keys and counters survive restarts and
are shared by every replica; `MemoryGatewayStore` is the test double.

Rate limits are shared too: with N API replicas behind a load balancer, per-process buckets would let a key
through at N times its rate. The Postgres store keeps one GCRA state per key (the "theoretical arrival time",
one float) and takes a token with a single upsert on Postgres' clock, so replicas agree without a clock of
their own; it is the token bucket's arithmetic without a refill step.

A key reads `rtk_<id>_<secret>`: the id is public (listed, revoked by), the secret is 256 random bits, and only
the SHA-256 of the whole key is stored. Keys are high-entropy random strings, so a fast hash is the right one
(a password hash would only slow every request); lookups compare digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any, Protocol

from ragtide.contracts.pg import SerialConnection

KEY_PATTERN = re.compile(r"^rtk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@dataclass(frozen=True)
class ApiKey:
    """One key's record (never the secret)."""

    id: str
    tenant: str
    name: str
    digest: bytes
    rate_per_s: float | None = None
    burst: int | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None


def digest(key: str) -> bytes:
    """SHA-256 of the whole key."""
    return hashlib.sha256(key.encode()).digest()


def new_key(
    tenant: str, name: str = "", rate_per_s: float | None = None, burst: int | None = None
) -> tuple[str, ApiKey]:
    """A fresh key and its record; the caller shows the key once and stores only the record."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"tenant: {tenant!r} must be 1-128 characters of letters, digits and _.:@-")
    key_id = secrets.token_hex(6)
    key = f"rtk_{key_id}_{secrets.token_urlsafe(32)}"
    now = datetime.now(UTC)
    return key, ApiKey(key_id, tenant, name, digest(key), rate_per_s, burst, created_at=now)


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    m = KEY_PATTERN.match(key)
    return m.group(1) if m else None


def matches(record: ApiKey, key: str) -> bool:
    """Constant-time check of a presented key against the stored digest."""
    return hmac.compare_digest(record.digest, digest(key))


class TokenBucket:
    """`rate` tokens per second, at most `capacity`; `take()` says how long to wait when empty."""

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.at = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class GatewayStore(Protocol):
    """Keys, quotas, usage and rate-limit buckets."""

    def add_key(self, record: ApiKey) -> None:
        """Store a new key record."""
        ...

    def get_key(self, key_id: str) -> ApiKey | None:
        """The record of one key id (revoked ones included)."""
        ...

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key record, oldest first."""
        ...

    def revoke_key(self, key_id: str) -> bool:
        """Mark revoked; False if there is no such active key."""
        ...

    def set_quota(self, tenant: str, daily_tokens: int | None) -> None:
        """A tenant's daily token quota (None: back to the default)."""
        ...

    def quota(self, tenant: str) -> int | None:
        """The tenant's own quota, or None for the default."""
        ...

    def add_usage(self, tenant: str, day: date, tokens: int, requests: int = 1) -> int:
        """Add to the day's counters; returns the day's token total."""
        ...

    def usage(self, tenant: str, day: date) -> int:
        """Tokens used by the tenant on that day."""
        ...

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> tuple[float, int]:
        """Take one request from `bucket` (shared by every replica): (0.0, tokens left), or (seconds until one
        is there, 0) when it is empty."""
        ...


SCHEMA_DDL = [
    "CREATE SCHEMA IF NOT EXISTS ragtide_gateway",
    """CREATE TABLE IF NOT EXISTS ragtide_gateway.api_keys (
         id text PRIMARY KEY, tenant text NOT NULL, name text NOT NULL DEFAULT '', key_hash bytea NOT NULL,
         rate_per_s double precision, burst integer,
         created_at timestamptz NOT NULL DEFAULT now(), revoked_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS api_keys_tenant ON ragtide_gateway.api_keys (tenant)",
    """CREATE TABLE IF NOT EXISTS ragtide_gateway.tenant_quotas (
         tenant text PRIMARY KEY, daily_tokens bigint NOT NULL CHECK (daily_tokens >= 0))""",
    """CREATE TABLE IF NOT EXISTS ragtide_gateway.usage (
         tenant text NOT NULL, day date NOT NULL, tokens bigint NOT NULL DEFAULT 0,
         requests bigint NOT NULL DEFAULT 0, PRIMARY KEY (tenant, day))""",
    # GCRA: tat = when the bucket will be full again (epoch seconds, Postgres' clock)
    "CREATE TABLE IF NOT EXISTS ragtide_gateway.rate_limits (bucket text PRIMARY KEY, tat double precision NOT NULL)",
]

_NOW = "extract(epoch FROM statement_timestamp())::float8"  # one instant for the whole statement
# Admit when the new tat is at most `burst` emission intervals ahead of now; a refused request changes nothing.
_TAKE_TOKEN = f"""
INSERT INTO ragtide_gateway.rate_limits AS r (bucket, tat) VALUES (%(bucket)s, {_NOW} + %(t)s)
ON CONFLICT (bucket) DO UPDATE SET tat = greatest(r.tat, {_NOW}) + %(t)s
  WHERE greatest(r.tat, {_NOW}) + %(t)s - {_NOW} <= %(tau)s
RETURNING r.tat - {_NOW} AS ahead"""
_AHEAD = f"SELECT tat - {_NOW} AS ahead FROM ragtide_gateway.rate_limits WHERE bucket = %s"


def _record(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        digest=bytes(row["key_hash"]),
        rate_per_s=row["rate_per_s"],
        burst=row["burst"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


class PostgresGatewayStore:
    """The real store: one small serialised connection (every statement is a single indexed row)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._db = SerialConnection(dsn, setup=SCHEMA_DDL)

    def _run(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return self._db.run(sql, params)

    def migrate(self) -> None:
        """Create the schema and tables now (they are also created before the store's first statement)."""
        self._run("SELECT 1")

    def add_key(self, record: ApiKey) -> None:
        """Insert."""
        self._run(
            "INSERT INTO ragtide_gateway.api_keys (id, tenant, name, key_hash, rate_per_s, burst) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (record.id, record.tenant, record.name, record.digest, record.rate_per_s, record.burst),
        )

    def get_key(self, key_id: str) -> ApiKey | None:
        """By id."""
        rows = self._run("SELECT * FROM ragtide_gateway.api_keys WHERE id = %s", (key_id,))
        return _record(rows[0]) if rows else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Oldest first."""
        rows = self._run(
            "SELECT * FROM ragtide_gateway.api_keys WHERE %(t)s::text IS NULL OR tenant = %(t)s "
            "ORDER BY created_at, id",
            {"t": tenant},
        )
        return [_record(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Set revoked_at."""
        rows = self._run(
            "UPDATE ragtide_gateway.api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING id",
            (key_id,),
        )
        return bool(rows)

    def set_quota(self, tenant: str, daily_tokens: int | None) -> None:
        """Upsert or delete."""
        if daily_tokens is None:
            self._run("DELETE FROM ragtide_gateway.tenant_quotas WHERE tenant = %s", (tenant,))
        else:
            self._run(
                "INSERT INTO ragtide_gateway.tenant_quotas (tenant, daily_tokens) VALUES (%s, %s) "
                "ON CONFLICT (tenant) DO UPDATE SET daily_tokens = EXCLUDED.daily_tokens",
                (tenant, daily_tokens),
            )

    def quota(self, tenant: str) -> int | None:
        """The tenant's own quota."""
        rows = self._run("SELECT daily_tokens FROM ragtide_gateway.tenant_quotas WHERE tenant = %s", (tenant,))
        return int(rows[0]["daily_tokens"]) if rows else None

    def add_usage(self, tenant: str, day: date, tokens: int, requests: int = 1) -> int:
        """Atomic upsert-increment."""
        rows = self._run(
            "INSERT INTO ragtide_gateway.usage AS u (tenant, day, tokens, requests) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (tenant, day) DO UPDATE SET tokens = u.tokens + EXCLUDED.tokens, "
            "requests = u.requests + EXCLUDED.requests RETURNING tokens",
            (tenant, day, tokens, requests),
        )
        return int(rows[0]["tokens"])

    def usage(self, tenant: str, day: date) -> int:
        """The day's tokens."""
        rows = self._run("SELECT tokens FROM ragtide_gateway.usage WHERE tenant = %s AND day = %s", (tenant, day))
        return int(rows[0]["tokens"]) if rows else 0

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> tuple[float, int]:
        """One upsert when admitted; a second read of the state only to say how long a refused caller waits."""
        t = 1.0 / rate_per_s
        tau = burst * t
        rows = self._run(_TAKE_TOKEN, {"bucket": bucket, "t": t, "tau": tau})
        if rows:
            return 0.0, max(0, math.floor((tau - rows[0]["ahead"]) / t + 1e-9))
        rows = self._run(_AHEAD, (bucket,))
        ahead = rows[0]["ahead"] if rows else 0.0
        return max(ahead + t - tau, 1e-3), 0

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


class MemoryGatewayStore:
    """Test double with the same behaviour (share one between gateways to act as replicas)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.keys: dict[str, ApiKey] = {}
        self.quotas: dict[str, int] = {}
        self.used: dict[tuple[str, date], int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def add_key(self, record: ApiKey) -> None:
        """Insert (ids are unique)."""
        if record.id in self.keys:
            raise ValueError(f"duplicate key id {record.id}")
        self.keys[record.id] = record

    def get_key(self, key_id: str) -> ApiKey | None:
        """By id."""
        return self.keys.get(key_id)

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Insertion order."""
        return [k for k in self.keys.values() if tenant is None or k.tenant == tenant]

    def revoke_key(self, key_id: str) -> bool:
        """Set revoked_at."""
        rec = self.keys.get(key_id)
        if rec is None or not rec.active:
            return False
        self.keys[key_id] = replace(rec, revoked_at=datetime.now(UTC))
        return True

    def set_quota(self, tenant: str, daily_tokens: int | None) -> None:
        """Upsert or delete."""
        if daily_tokens is None:
            self.quotas.pop(tenant, None)
        else:
            self.quotas[tenant] = daily_tokens

    def quota(self, tenant: str) -> int | None:
        """The tenant's own quota."""
        return self.quotas.get(tenant)

    def add_usage(self, tenant: str, day: date, tokens: int, requests: int = 1) -> int:
        """Increment."""
        self.used[(tenant, day)] = self.used.get((tenant, day), 0) + tokens
        return self.used[(tenant, day)]

    def usage(self, tenant: str, day: date) -> int:
        """The day's tokens."""
        return self.used.get((tenant, day), 0)

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> tuple[float, int]:
        """A token bucket per name."""
        return take_from(self.buckets, bucket, rate_per_s, burst, self.clock())


def take_from(buckets: dict[str, TokenBucket], name: str, rate: float, burst: int, now: float) -> tuple[float, int]:
    """Take from the named bucket (new, or changed limits: a full one): (wait, tokens left)."""
    b = buckets.get(name)
    if b is None or b.rate != rate or b.capacity != burst:
        b = buckets[name] = TokenBucket(rate, burst, now)
    return b.take(now), int(b.tokens)
