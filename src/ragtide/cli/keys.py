"""`ragtide keys`: API keys and quotas of tenants."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ragtide.cli.common import app, console, current_settings

keys_app = typer.Typer(help="API keys and quotas of tenants (stored hashed in Postgres).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _gateway_store() -> Any:
    from ragtide.gateway.store import PostgresGatewayStore

    store = PostgresGatewayStore(current_settings().postgres.state())
    store.migrate()
    return store


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant this key acts for (its searches see only its rows)")],
    name: Annotated[str, typer.Option(help="a label for people")] = "",
    rate: Annotated[float | None, typer.Option(min=0.001, help="requests/s (default: gateway.rate_per_s)")] = None,
    burst: Annotated[int | None, typer.Option(min=1, help="bucket size (default: gateway.burst)")] = None,
) -> None:
    """Create a key; it is printed once (on stdout) and only its hash is stored."""
    from ragtide.gateway.store import new_key

    try:
        key, record = new_key(tenant, name, rate, burst)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from exc
    _gateway_store().add_key(record)
    console.print(f"created key [bold]{record.id}[/] for tenant [bold]{tenant}[/]; it is shown only now:", style="dim")
    print(key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None) -> None:
    """Every key (id, tenant, name, limits, created, revoked); never the secret."""
    keys = _gateway_store().list_keys(tenant)
    table = Table("id", "tenant", "name", "rate/s", "burst", "created", "revoked", title=f"{len(keys)} key(s)")
    for k in keys:
        table.add_row(
            k.id,
            k.tenant,
            k.name,
            "default" if k.rate_per_s is None else f"{k.rate_per_s:g}",
            "default" if k.burst is None else str(k.burst),
            k.created_at.isoformat(timespec="seconds") if k.created_at else "",
            k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (from `keys list`)")]) -> None:
    """Revoke a key (effective within gateway.key_cache_s seconds)."""
    if not _gateway_store().revoke_key(key_id):
        console.print(f"[red]no active key {key_id}[/]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@keys_app.command("quota")
def keys_quota(
    tenant: Annotated[str, typer.Argument(help="the tenant")],
    daily_tokens: Annotated[int | None, typer.Option(min=0, help="tokens per UTC day; omit to show")] = None,
    default: Annotated[bool, typer.Option("--default", help="back to gateway.daily_tokens")] = False,
) -> None:
    """Show or set a tenant's daily token quota (prompt + completion tokens; searches count their query)."""
    from datetime import UTC, datetime

    store, s = _gateway_store(), current_settings()
    if default:
        store.set_quota(tenant, None)
    elif daily_tokens is not None:
        store.set_quota(tenant, daily_tokens)
    own = store.quota(tenant)
    limit = s.gateway.daily_tokens if own is None else own
    used = store.usage(tenant, datetime.now(UTC).date())
    console.print_json(data={"tenant": tenant, "daily_tokens": limit, "own_quota": own is not None, "used_today": used})


@keys_app.command("new-admin-key")
def keys_new_admin_key() -> None:
    """Print a random admin key for RAGTIDE_GATEWAY__ADMIN_KEY (prod mode)."""
    import secrets

    print(secrets.token_hex(32))
