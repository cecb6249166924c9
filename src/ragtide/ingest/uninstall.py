"""`ragtide uninstall-source`: remove everything ragtide created in the user's database.

In order: the connector and the replication slot (`resync.detach_source`; a forgotten slot keeps WAL forever), the
publication, schema `ragtide` (heartbeat, canary, signal tables) in the source, and schemas `ragtide_gateway`
(API keys, usage) and `ragtide_embedder` (truncate watermarks) where the state lives. What the role may not drop
(a publication another role owns) is returned as SQL for the database owner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from ragtide.contracts.settings import RagtideSettings, redact_dsn
from ragtide.ingest import pgsetup
from ragtide.ingest.resync import detach_source


@dataclass
class Removal:
    """What was removed, and what is left for someone with more rights."""

    done: list[str] = field(default_factory=list)
    for_owner: list[str] = field(default_factory=list)  # SQL the database owner must run


def planned(settings: RagtideSettings) -> list[str]:
    """What uninstall will remove from one source database, for the confirmation prompt."""
    pg, c = settings.postgres, settings.connect
    state = "state database" if pg.state_dsn else "source database"
    return [
        f"connector {c.connector_name} and its offsets (Connect at {redact_dsn(c.url)})",
        f"replication slot {c.slot_name} and publication {c.publication} in {pg.host}:{pg.port}/{pg.database}",
        f"schema {pgsetup.CONTROL_SCHEMA} (heartbeat, canary, signal tables) in the source database",
        f"schemas {', '.join(pgsetup.STATE_SCHEMAS)} (API keys, usage, truncate watermarks) in the {state}",
    ]


def uninstall_source(settings: RagtideSettings, progress: Callable[[str], None] = lambda _: None) -> Removal:
    """Remove the connector, slot, publication and ragtide's schemas of one source database (its settings:
    `Stack.databases()` gives each)."""
    # Leaving for good: with Connect gone too the slot is dropped all the same (Connect's own offsets topic, if it
    # is ever started again, still names the connector: a later install resyncs)
    out = Removal(done=detach_source(settings, progress, force=True))
    pub = settings.connect.publication
    with psycopg.connect(settings.postgres.dsn(), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT pg_has_role(current_user, pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s", (pub,)
        ).fetchone()
        if row is not None:
            drop = f"DROP PUBLICATION {pub};"  # a validated name (connect.publication)
            if row[0]:
                conn.execute(drop)
                out.done.append(f"dropped publication {pub}")
            else:
                out.for_owner.append(drop)
    for dsn, schemas in (
        (settings.postgres.dsn(), (pgsetup.CONTROL_SCHEMA,)),
        (settings.postgres.state(), pgsetup.STATE_SCHEMAS),
    ):
        dropped, refused = pgsetup.drop_schemas(dsn, schemas)
        out.done += [f"dropped schema {schema}" for schema in dropped]
        out.for_owner += refused
    return out
