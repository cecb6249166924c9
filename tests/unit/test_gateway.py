"""The gateway's rules on its in-memory store: keys, admin, rate limits, daily quotas, start-up refusals."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import HTTPException
from prometheus_client import CollectorRegistry

from ragtide.contracts.errors import ConfigError, StoreUnavailable
from ragtide.contracts.settings import GatewaySettings, RagtideSettings, load_settings
from ragtide.gateway.gateway import Caller, Gateway, bearer, check_config, placeholder_problem, seconds_to_midnight
from ragtide.gateway.store import MemoryGatewayStore, key_id_of, matches, new_key

ADMIN = "3f9c1a7b5e2d4c6a8b0f1e3d5c7a9b2e4f6a8c0e1d3b5a7c9e2f4a6b8d0c1e3f"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.day = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def mono(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self.day


def gateway(store: MemoryGatewayStore, clock: Clock, **overrides: object) -> Gateway:
    settings = GatewaySettings(**{"key_cache_s": 0.0, "admin_key": ADMIN, **overrides})  # type: ignore[arg-type]
    return Gateway(settings, store, clock.mono, clock.wall)


def test_a_key_is_stored_only_as_its_hash_and_matches_itself() -> None:
    key, record = new_key("acme", "ci")
    assert key.startswith(f"rtk_{record.id}_") and key_id_of(key) == record.id
    assert key.encode() not in record.digest and len(record.digest) == 32
    assert matches(record, key) and not matches(record, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert key_id_of("rtk_nothex_zzz") is None
    with pytest.raises(ValueError, match="tenant"):
        new_key("bad tenant!")


def test_authentication_dev_prod_revoked_and_admin() -> None:
    store, clock = MemoryGatewayStore(), Clock()
    key, record = new_key("acme")
    store.add_key(record)
    dev = gateway(store, clock, mode="dev")
    assert dev.authenticate(None) == Caller(tenant=None)
    assert dev.authenticate(key) == Caller(tenant="acme", key_id=record.id)
    assert dev.authenticate(ADMIN).admin

    prod = gateway(store, clock, mode="prod")
    with pytest.raises(HTTPException) as missing:
        prod.authenticate(None)
    assert missing.value.status_code == 401 and "missing API key" in missing.value.detail
    with pytest.raises(HTTPException) as wrong:
        prod.authenticate(key[:-2] + "xx")
    assert wrong.value.status_code == 401
    with pytest.raises(HTTPException) as not_admin:
        prod.require_admin(key)
    assert not_admin.value.status_code == 403
    assert prod.require_admin(ADMIN).admin

    assert store.revoke_key(record.id) and not store.revoke_key(record.id)
    with pytest.raises(HTTPException) as revoked:
        prod.authenticate(key)
    assert revoked.value.status_code == 401 and "revoked" in revoked.value.detail


def test_dev_mode_takes_a_placeholder_key_as_no_key_but_not_a_wrong_ragtide_key() -> None:
    """OpenAI clients refuse to send no key, so dev mode must serve "sk-no-key" as it serves no key; a key shaped
    like a ragtide key that is unknown or revoked is still refused, and prod mode refuses every key it cannot find."""
    store, clock = MemoryGatewayStore(), Clock()
    key, record = new_key("acme")
    store.add_key(record)
    store.revoke_key(record.id)
    unknown = "rtk_000000000000_" + "A" * 43
    dev, prod = gateway(store, clock, mode="dev"), gateway(store, clock, mode="prod")
    for placeholder in ("sk-no-key", "EMPTY", "not-needed"):
        assert dev.authenticate(placeholder) == Caller(tenant=None) == dev.authenticate(None)
        assert dev.admit(dev.authenticate(placeholder)) == {}  # nothing to limit, as without a key
        with pytest.raises(HTTPException) as refused:
            prod.authenticate(placeholder)
        assert refused.value.status_code == 401 and refused.value.detail == "invalid API key"
    mangled = (key[:-3], f'"{key}"', "rtk_not_a_key")  # truncated, quoted from an env file: a ragtide key all the same
    for wrong, reason in ((unknown, "invalid API key"), (key, "revoked"), *((m, "invalid API key") for m in mangled)):
        for gw in (dev, prod):
            with pytest.raises(HTTPException) as refused:
                gw.authenticate(wrong)
            assert refused.value.status_code == 401 and reason in refused.value.detail


def test_bearer_header_forms() -> None:
    assert bearer("Bearer abc", None) == "abc"
    assert bearer(None, " abc ") == "abc"
    assert bearer(None, None) is None
    with pytest.raises(HTTPException) as exc:
        bearer("Basic dXNlcjpwdw==", None)
    assert exc.value.status_code == 401


def test_token_bucket_per_key_then_429_with_retry_after() -> None:
    clock = Clock()
    store = MemoryGatewayStore(clock.mono)
    key, record = new_key("acme", rate_per_s=2.0, burst=3)
    store.add_key(record)
    gw = gateway(store, clock)
    caller = gw.authenticate(key)
    remaining = [int(gw.admit(caller)["X-RateLimit-Remaining"]) for _ in range(3)]
    assert remaining == [2, 1, 0]
    with pytest.raises(HTTPException) as limited:
        gw.admit(caller)
    assert limited.value.status_code == 429 and limited.value.headers is not None
    assert limited.value.headers["Retry-After"] == "1" and "2 requests/s" in limited.value.detail
    clock.t += 0.5  # one token back at 2/s
    gw.admit(caller)
    other_key, other = new_key("acme")
    store.add_key(other)
    gw.admit(gw.authenticate(other_key))  # buckets are per key, not per tenant


def test_replicas_share_a_keys_rate_limit_through_the_store() -> None:
    """Two API replicas (two gateways, one store): the key's burst is spent across both, not per replica."""
    clock = Clock()
    store = MemoryGatewayStore(clock.mono)
    key, record = new_key("acme", rate_per_s=1.0, burst=4)
    store.add_key(record)
    a, b = gateway(store, clock), gateway(store, clock)
    caller = a.authenticate(key)
    assert [a.admit(caller)["X-RateLimit-Remaining"], b.admit(caller)["X-RateLimit-Remaining"]] == ["3", "2"]
    a.admit(caller)
    b.admit(caller)
    for gw in (a, b):
        with pytest.raises(HTTPException) as limited:
            gw.admit(caller)
        assert limited.value.status_code == 429
    assert a.local_rate_limits == b.local_rate_limits == 0


class OutageStore(MemoryGatewayStore):
    """Fails in every method while `down`, as the Postgres store does when Postgres is unreachable."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if callable(attr) and not name.startswith("_") and super().__getattribute__("down"):

            def unavailable(*_: Any, **__: Any) -> Any:
                raise StoreUnavailable("gateway store (Postgres) unavailable: connection refused")

            return unavailable
        return attr


def test_without_the_store_the_limit_holds_per_process_instead_of_failing_requests() -> None:
    clock = Clock()
    store = OutageStore(clock.mono)
    key, record = new_key("acme", rate_per_s=1.0, burst=2)
    store.add_key(record)
    gw = gateway(store, clock)
    caller = gw.authenticate(key)
    store.down = True
    assert [gw.admit(caller)["X-RateLimit-Remaining"] for _ in range(2)] == ["1", "0"]
    with pytest.raises(HTTPException) as limited:
        gw.admit(caller)
    assert limited.value.status_code == 429 and gw.local_rate_limits == 3


def test_one_policy_on_every_path_while_the_store_is_down_and_what_was_not_charged_is_charged_later() -> None:
    """Key lookup after the cache expired, quota read, usage read, charge and rate limit: none fails a request; a
    key never seen is 503 (it cannot be checked), never 500; the uncharged tokens land once the store is back."""
    clock = Clock()
    store = OutageStore(clock.mono)
    key, record = new_key("acme")
    other, other_record = new_key("globex")
    store.add_key(record)
    store.add_key(other_record)
    store.set_quota("acme", 1000)
    registry = CollectorRegistry()
    settings = GatewaySettings(key_cache_s=5.0, admin_key=ADMIN)  # type: ignore[arg-type]
    gw = Gateway(settings, store, clock.mono, clock.wall, registry)
    caller = gw.authenticate(key)
    assert gw.admit(caller)["X-Quota-Limit"] == "1000"
    gw.charge(caller, 100)

    store.down = True
    clock.t += 60  # every cached lookup has expired
    assert gw.authenticate(key) == caller  # the last record read
    headers = gw.admit(caller)
    assert headers["X-Quota-Limit"] == "1000" and headers["X-Quota-Remaining"] == "900"
    gw.charge(caller, 40)
    gw.charge(caller, 2)
    assert gw.quota_headers(caller)["X-Quota-Remaining"] == "858"
    with pytest.raises(HTTPException) as unknown:
        gw.authenticate(other)
    assert unknown.value.status_code == 503 and unknown.value.headers == {"Retry-After": "5"}
    assert {p for p in ("key", "quota", "usage", "charge", "rate_limit") if gw.fallbacks_on(p)} == {
        "key",
        "quota",
        "rate_limit",
        "charge",
    }
    assert registry.get_sample_value("ragtide_gateway_uncharged_tokens") == 42
    assert registry.get_sample_value("ragtide_gateway_store_fallbacks_total", {"path": "charge"}) == 2

    other_caller = Caller(tenant="globex", key_id=other_record.id)
    with ThreadPoolExecutor(8) as pool:  # concurrent charges while down: none of them is lost
        list(pool.map(lambda n: gw.charge(other_caller, n), [1] * 50))
    yesterday = clock.day.date()
    clock.day += timedelta(days=1)  # the outage crosses midnight: owed tokens stay on the day they were used

    store.down = False
    gw.charge(caller, 8)
    assert store.usage("globex", yesterday) == 50  # settled by another tenant's charge
    assert store.usage("acme", yesterday) == 142 and store.usage("acme", clock.day.date()) == 8
    assert registry.get_sample_value("ragtide_gateway_uncharged_tokens") == 0


def test_daily_quota_is_charged_persisted_and_resets_at_midnight_utc() -> None:
    store, clock = MemoryGatewayStore(), Clock()
    key, record = new_key("acme")
    store.add_key(record)
    store.set_quota("acme", 100)
    gw = gateway(store, clock)
    caller = gw.authenticate(key)
    headers = gw.admit(caller)
    assert headers["X-Quota-Limit"] == "100" and headers["X-Quota-Remaining"] == "100"
    assert headers["X-Quota-Reset"] == str(12 * 3600)
    gw.charge(caller, 60)
    assert gw.admit(caller)["X-Quota-Remaining"] == "40"
    gw.charge(caller, 45)
    with pytest.raises(HTTPException) as over:
        gw.admit(caller)
    assert over.value.status_code == 429 and over.value.headers is not None
    assert over.value.headers["Retry-After"] == str(12 * 3600) and "acme" in over.value.detail

    restarted = gateway(store, clock)  # the counters live in the store
    with pytest.raises(HTTPException):
        restarted.admit(restarted.authenticate(key))
    clock.day += timedelta(days=1)
    assert restarted.admit(caller)["X-Quota-Remaining"] == "100"


def test_admin_and_anonymous_dev_callers_are_not_limited() -> None:
    store, clock = MemoryGatewayStore(), Clock()
    gw = gateway(store, clock, burst=1, daily_tokens=0)
    for _ in range(5):
        assert gw.admit(Caller(tenant=None, admin=True)) == {}
        assert gw.admit(Caller(tenant=None)) == {}


def test_seconds_to_midnight() -> None:
    assert seconds_to_midnight(datetime(2026, 1, 1, 23, 59, 30, tzinfo=UTC)) == 30
    assert seconds_to_midnight(datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)) == 86400


def test_config_refuses_prod_without_a_real_admin_key_and_dev_off_loopback() -> None:
    def settings(**kw: object) -> RagtideSettings:
        return load_settings(RagtideSettings, **kw)

    with pytest.raises(ConfigError, match=r"gateway\.admin_key: required"):
        check_config(settings(gateway={"mode": "prod"}))
    for bad in (
        "changeme",
        "changeme-changeme-changeme-changeme-1234",
        "a" * 40,
        "my-secret-key-0123456789abcdefghijklmn",
    ):
        with pytest.raises(ConfigError, match=r"gateway\.admin_key"):
            check_config(settings(gateway={"mode": "prod", "admin_key": bad}))
    check_config(settings(gateway={"mode": "prod", "admin_key": ADMIN}, api={"host": "0.0.0.0"}))
    with pytest.raises(ConfigError, match=r"gateway\.mode"):
        check_config(settings(api={"host": "0.0.0.0"}))
    check_config(settings(api={"host": "localhost"}))
    assert placeholder_problem(ADMIN) is None
