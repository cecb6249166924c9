"""The gateway in front of the data endpoints: who is calling (API key → tenant), may they (token bucket per
key, shared by every replica through the store; token quota per tenant per UTC day), and what it cost (charged
after the work, from real token counts).

Answers are HTTP errors with reasons: 401 (no or unknown or revoked key), 403 (admin only), 429 with
`Retry-After` (rate or quota). Every admitted request gets rate and quota headers. The check at start-up
refuses a prod configuration without a real admin key, and dev mode on a non-loopback address.

With the store (Postgres) unavailable, one policy holds on every path, and search keeps being served: a key
lookup uses the last record this process read (a key it never saw gets 503 with `Retry-After`: it cannot be
checked), a quota read the last known or the default, usage this process' own count, the rate limit
per-process buckets; tokens that cannot be charged are kept and charged with the tenant's next charge once the
store answers. Each fallback is counted (`ragtide_gateway_store_fallbacks_total{path}`,
`ragtide_gateway_uncharged_tokens`) and logged at most once a minute. Never a 500.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge

from ragtide.contracts.errors import ConfigError, StoreUnavailable
from ragtide.contracts.logging import Throttled
from ragtide.contracts.net import is_loopback
from ragtide.contracts.settings import GatewaySettings, RagtideSettings
from ragtide.gateway.store import ApiKey, GatewayStore, TokenBucket, key_id_of, matches, take_from

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

_PLACEHOLDER_WORDS = ("change", "secret", "placeholder", "example", "default", "password", "replace", "todo", "xxx")


def check_config(settings: RagtideSettings) -> None:
    """Refuse a configuration that would expose the API: each message names the field."""
    g = settings.gateway
    if g.mode == "dev":
        host = settings.api.host
        if not is_loopback(host):
            raise ConfigError(
                f"gateway.mode: dev mode serves requests without a key, so the API must listen on loopback "
                f"(api.host is {host!r}); set RAGTIDE_GATEWAY__MODE=prod and an admin key"
            )
        return
    if g.admin_key is None:
        raise ConfigError("gateway.admin_key: required in prod mode (RAGTIDE_GATEWAY__ADMIN_KEY)")
    problem = placeholder_problem(g.admin_key.get_secret_value())
    if problem:
        raise ConfigError(f"gateway.admin_key: {problem}; generate one with `ragtide keys new-admin-key`")


def placeholder_problem(key: str) -> str | None:
    """Why `key` is not a real secret, or None."""
    if len(key) < 32:
        return f"too short ({len(key)} characters; at least 32)"
    lowered = key.lower()
    for word in _PLACEHOLDER_WORDS:
        if word in lowered:
            return f"looks like a placeholder (contains {word!r})"
    if len(set(key)) < 12:
        return "too little variety to be random"
    return None


@dataclass(frozen=True)
class Caller:
    """Who a request acts for. tenant None: every tenant (admin, or dev mode without a ragtide key)."""

    tenant: str | None
    key_id: str | None = None
    admin: bool = False
    rate_per_s: float | None = None  # the key's own limits (None: the gateway's defaults)
    burst: int | None = None

    @property
    def label(self) -> str:
        """For metrics and logs (never the key)."""
        return self.tenant if self.tenant is not None else ("admin" if self.admin else "anonymous")


def seconds_to_midnight(now: datetime) -> int:
    """Until the quota day (UTC) rolls over."""
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return max(1, math.ceil((tomorrow - now).total_seconds()))


def bearer(authorization: str | None, x_api_key: str | None) -> str | None:
    """The presented key: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise HTTPException(401, "Authorization: expected 'Bearer <api key>'", headers={"WWW-Authenticate": "Bearer"})
    return None


class Gateway:
    """Authentication, admission (rate + quota) and charging; thread-safe, one per app."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: GatewayStore | None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.monotonic = monotonic
        self.wall = wall
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[ApiKey | None, float]] = {}
        self._buckets: dict[str, TokenBucket] = {}  # only while the store cannot be reached
        self._quotas: dict[str, tuple[int | None, float]] = {}
        self._used: dict[tuple[str, date], int] = {}
        self._uncharged: dict[tuple[str, date], tuple[int, int]] = {}  # (tokens, requests) to charge when it is back
        registry = registry if registry is not None else CollectorRegistry()
        self.fallbacks = Counter(
            "ragtide_gateway_store_fallbacks",
            "gateway decisions taken without the store (Postgres unavailable), by path",
            ["path"],
            registry=registry,
        )
        self.uncharged_tokens = Gauge(
            "ragtide_gateway_uncharged_tokens",
            "tokens used while the store was unavailable, not charged yet (charged with the tenant's next charge)",
            registry=registry,
        )
        self._down_log = Throttled(log, "gateway store unavailable; serving with what this process knows")
        self.registry = registry

    def _store_down(self, path: str, exc: StoreUnavailable) -> None:
        self.fallbacks.labels(path).inc()
        self._down_log.failed(exc, path=path)

    def fallbacks_on(self, path: str) -> int:
        """Decisions taken without the store on one path (key, quota, usage, charge, rate_limit)."""
        return int(self.registry.get_sample_value("ragtide_gateway_store_fallbacks_total", {"path": path}) or 0)

    @property
    def local_rate_limits(self) -> int:
        """Rate-limit decisions taken from this process' own buckets (the store was down)."""
        return self.fallbacks_on("rate_limit")

    def _fresh(self, memo: dict[K, tuple[V, float]], key: K, fetch: Callable[[], V], path: str) -> V:
        """`fetch()` at most once per `key_cache_s` per key (keys and quotas change rarely; requests are many).
        The store unavailable: the last value read, however old; StoreUnavailable when there is none."""
        now = self.monotonic()
        with self._lock:
            cached = memo.get(key)
        if cached is not None and now - cached[1] < self.settings.key_cache_s:
            return cached[0]
        try:
            value = fetch()
        except StoreUnavailable as exc:
            self._store_down(path, exc)
            if cached is None:
                raise
            return cached[0]
        with self._lock:
            memo[key] = (value, now)
        return value

    # --- who ---------------------------------------------------------------------------------------------
    def _lookup(self, key_id: str) -> ApiKey | None:
        try:
            return self._fresh(self._keys, key_id, lambda: self.store.get_key(key_id) if self.store else None, "key")
        except StoreUnavailable as exc:
            raise HTTPException(
                503,
                f"the API key cannot be checked now ({exc}); retry shortly",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from exc

    def authenticate(self, key: str | None) -> Caller:
        """The caller of a request, or 401.

        Dev mode treats a key that is neither the admin key nor a ragtide key (`rtk_…`, even truncated or quoted) as
        no key: OpenAI clients refuse to send none, so users put a placeholder such as "sk-no-key". A ragtide-shaped
        key that is unknown or revoked is still a 401 in dev mode: its caller meant to act as a tenant, and serving
        every tenant's rows instead would hide the mistake."""
        admin = self.settings.admin_key.get_secret_value() if self.settings.admin_key else None
        if key is None:
            if self.settings.mode == "dev":
                return Caller(tenant=None)
            raise HTTPException(
                401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if admin is not None and hmac.compare_digest(key.encode(), admin.encode()):
            return Caller(tenant=None, admin=True)
        key_id = key_id_of(key)
        if key_id is None and self.settings.mode == "dev" and not key.strip().strip("'\"").startswith("rtk_"):
            return Caller(tenant=None)  # a placeholder; anything like a ragtide key (even mangled) is checked
        record = self._lookup(key_id) if key_id else None
        if record is None or not matches(record, key):
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if not record.active:
            raise HTTPException(401, f"API key {record.id} was revoked", headers={"WWW-Authenticate": "Bearer"})
        return Caller(tenant=record.tenant, key_id=record.id, rate_per_s=record.rate_per_s, burst=record.burst)

    def require_admin(self, key: str | None) -> Caller:
        """Admin endpoints: the admin key (dev mode: also no key)."""
        caller = self.authenticate(key)
        if caller.admin or (caller.tenant is None and self.settings.mode == "dev"):
            return caller
        raise HTTPException(403, "this endpoint needs the admin key (gateway.admin_key)")

    # --- may they ----------------------------------------------------------------------------------------
    def _limit(self, tenant: str) -> int:
        try:
            own = self._fresh(self._quotas, tenant, lambda: self.store.quota(tenant) if self.store else None, "quota")
        except StoreUnavailable:
            own = None  # never read: the default quota
        return self.settings.daily_tokens if own is None else own

    def _usage(self, tenant: str, day: date) -> int:
        with self._lock:
            used = self._used.get((tenant, day))
        if used is None:
            try:
                used = self.store.usage(tenant, day) if self.store is not None else 0
            except StoreUnavailable as exc:
                self._store_down("usage", exc)
                return 0  # counted from here on by this process' charges
            with self._lock:
                self._used[(tenant, day)] = max(used, self._used.get((tenant, day), 0))
        return used

    def admit(self, caller: Caller) -> dict[str, str]:
        """Take a rate token and check the quota; the headers to send, or 429 with Retry-After."""
        if caller.tenant is None:
            return {}
        headers: dict[str, str] = {}
        rate = caller.rate_per_s or self.settings.rate_per_s  # authenticate() read the key's record already
        burst = caller.burst or self.settings.burst
        wait, remaining = self._take(caller.key_id or caller.tenant, rate, burst)
        headers["X-RateLimit-Limit"] = f"{burst}, {burst};w={burst / rate:g}"
        headers["X-RateLimit-Remaining"] = str(remaining)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise HTTPException(
                429,
                f"rate limit: {rate:g} requests/s (burst {burst}) for key {caller.key_id}; retry in {wait:.2f} s",
                headers={**headers, "Retry-After": str(retry)},
            )
        headers.update(self.quota_headers(caller))
        if int(headers["X-Quota-Remaining"]) <= 0:
            raise HTTPException(
                429,
                f"daily token quota of tenant {caller.tenant!r} used up ({headers['X-Quota-Limit']} tokens); "
                f"resets at 00:00 UTC",
                headers={**headers, "Retry-After": headers["X-Quota-Reset"]},
            )
        return headers

    def _take(self, bucket: str, rate: float, burst: int) -> tuple[float, int]:
        """From the store's bucket, shared by every replica; if the store is down, from this process' own (the
        limit then holds per replica) rather than refusing every request or admitting them all."""
        if self.store is not None:
            try:
                taken = self.store.take_token(bucket, rate, burst)
                self._down_log.recovered()
                return taken
            except StoreUnavailable as exc:
                self._store_down("rate_limit", exc)
        with self._lock:
            return take_from(self._buckets, bucket, rate, burst, self.monotonic())

    def quota_headers(self, caller: Caller) -> dict[str, str]:
        """Limit, remaining and seconds to reset of the caller's tenant quota."""
        if caller.tenant is None:
            return {}
        now = self.wall()
        limit = self._limit(caller.tenant)
        used = self._usage(caller.tenant, now.date())
        return {
            "X-Quota-Limit": str(limit),
            "X-Quota-Remaining": str(max(0, limit - used)),
            "X-Quota-Reset": str(seconds_to_midnight(now)),
        }

    # --- what it cost ------------------------------------------------------------------------------------
    def charge(self, caller: Caller, tokens: int) -> None:
        """Add the request's tokens to the tenant's day (persisted; the store's total wins)."""
        if caller.tenant is None:
            return
        day = self.wall().date()
        slot = (caller.tenant, day)
        total: int | None = None
        if self.store is not None:
            try:
                total = self.store.add_usage(caller.tenant, day, tokens)
                self._down_log.recovered()
            except StoreUnavailable as exc:
                self._store_down("charge", exc)
                self._owe(slot, tokens, 1)
            else:
                total = self._settle(caller.tenant, day, total)
        with self._lock:
            if total is None:
                total = self._used.get(slot, 0) + tokens
            self._used[slot] = max(total, self._used.get(slot, 0))

    def _owe(self, slot: tuple[str, date], tokens: int, requests: int) -> None:
        with self._lock:
            owed_tokens, owed_requests = self._uncharged.get(slot, (0, 0))
            self._uncharged[slot] = (owed_tokens + tokens, owed_requests + requests)
            self.uncharged_tokens.set(sum(t for t, _ in self._uncharged.values()))

    def _settle(self, tenant: str, today: date, total: int) -> int:
        """The store answers again: charge what requests could not charge during the outage (every tenant's, on the
        days they were made); returns the caller's total for today."""
        with self._lock:
            owed, self._uncharged = self._uncharged, {}
            self.uncharged_tokens.set(sum(t for t, _ in self._uncharged.values()))
        for slot, (tokens, requests) in sorted(owed.items()):
            try:
                charged = self.store.add_usage(slot[0], slot[1], tokens, requests) if self.store else 0
            except StoreUnavailable as exc:
                self._store_down("charge", exc)
                self._owe(slot, tokens, requests)
                continue
            if slot == (tenant, today):
                total = charged
        return total
