"""`ragtide doctor`: check the source database before anything touches it, one line per check, each failure with
the exact SQL or setting that fixes it.

Every check reads only catalogs and settings (nothing is created), so it is safe against a production database.
A check is `ok`, `warn` (works, with a cost or risk the user should know) or `fail` (the pipeline cannot run, or
would lose changes). `up` runs the same checks and stops on a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import psycopg

from ragtide.contracts.settings import RagtideSettings, redact_dsn
from ragtide.ingest import pgsetup
from ragtide.ingest.sources import CANARY_TABLE, SourcesConfig, SourceTable

MIN_VERSION = 120000  # Debezium 3.x streams from PostgreSQL 12 and later (pgoutput)
# Roles that grant replication on managed services (rolreplication cannot be set there).
MANAGED_REPLICATION_ROLES = ("rds_replication", "azure_pg_admin", "alloydbsuperuser")

Status = Literal["ok", "warn", "fail"]
Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        """`✓ name: detail`, or `✗ name: detail; fix: ...`."""
        mark = {"ok": "✓", "warn": "!", "fail": "✗"}[self.status]
        return f"{mark} {self.name}: {self.detail}" + (f"\n    fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Report:
    """Every check, in order."""

    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(c.status != "fail" for c in self.checks)

    def failed(self) -> list[Check]:
        """The failures."""
        return [c for c in self.checks if c.status == "fail"]

    def text(self) -> str:
        """The report as printed."""
        return "\n".join(c.line() for c in self.checks)


def _one(conn: Conn, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _quote(name: str) -> str:
    """An SQL identifier as a fix must spell it: quoted unless a plain lower-case name."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def _ident(table: str) -> str:
    return ".".join(f'"{p}"' if not p.isidentifier() or p != p.lower() else p for p in table.split("."))


class Doctor:
    """The checks against one source database, for one sources config."""

    def __init__(self, settings: RagtideSettings, sources: SourcesConfig) -> None:
        self.s = settings
        self.sources = sources
        self.user = settings.postgres.user

    def run(self, connect_check: bool = True) -> Report:
        """Every check; a database that cannot be reached ends the report at that line."""
        pg = self.s.postgres
        where = f"{pg.host}:{pg.port}/{pg.database} as {pg.user}"
        try:
            conn: Conn = psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return Report((Check("connection", "fail", f"cannot connect to {where}: {reason}", _connect_fix(reason)),))
        with conn:
            checks = [Check("connection", "ok", f"connected to {where}"), self._version(conn)]
            if checks[-1].status != "fail":  # an unsupported server: the rest would not mean much
                server = (self._wal_level, self._slots, self._wal_senders, self._replication_role, self._wal_keep_size)
                checks += [check(conn) for check in server]
                checks += [
                    self._control_schema(conn),
                    *self._table_checks(conn),
                    self._publication(conn),
                    self._state(),
                ]
        if connect_check:
            checks.append(self._from_connect())
        return Report(tuple(checks))

    # -- server ------------------------------------------------------------------------------------------------

    def _version(self, conn: Conn) -> Check:
        num = int(_one(conn, "SHOW server_version_num"))
        version = str(_one(conn, "SHOW server_version")).split()[0]
        if num < MIN_VERSION:
            return Check("version", "fail", f"PostgreSQL {version}", "upgrade to PostgreSQL 12 or later")
        return Check("version", "ok", f"PostgreSQL {version}")

    def _wal_level(self, conn: Conn) -> Check:
        level = str(_one(conn, "SHOW wal_level"))
        if level == "logical":
            return Check("wal_level", "ok", "logical")
        return Check(
            "wal_level",
            "fail",
            f"{level}: logical decoding needs wal_level=logical",
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
            "(RDS/Aurora: rds.logical_replication=1 in the parameter group; Cloud SQL: flag "
            "cloudsql.logical_decoding=on; Azure: azure.replication_support=logical)",
        )

    def _slots(self, conn: Conn) -> Check:
        slot = self.s.connect.slot_name
        limit = int(_one(conn, "SHOW max_replication_slots"))
        used = [str(r[0]) for r in conn.execute("SELECT slot_name FROM pg_replication_slots ORDER BY slot_name")]
        if slot in used:
            return Check("replication slots", "ok", f"slot {slot} exists ({len(used)} of {limit} used)")
        if len(used) < limit:
            return Check("replication slots", "ok", f"{limit - len(used)} of {limit} free")
        inactive = [
            str(r[0]) for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active ORDER BY 1")
        ]
        drop = f"; or drop an unused one: SELECT pg_drop_replication_slot('{inactive[0]}');" if inactive else ""
        return Check(
            "replication slots",
            "fail",
            f"all {limit} max_replication_slots are taken ({', '.join(used)}); ragtide needs one for slot {slot}",
            f"ALTER SYSTEM SET max_replication_slots = {limit + 1}; then restart PostgreSQL{drop}",
        )

    def _wal_senders(self, conn: Conn) -> Check:
        limit = int(_one(conn, "SHOW max_wal_senders"))
        busy = int(_one(conn, "SELECT count(*) FROM pg_stat_replication"))
        ours = bool(
            _one(
                conn,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active",
                (self.s.connect.slot_name,),
            )
        )
        if ours or busy < limit:
            return Check("wal senders", "ok", f"{limit - busy} of {limit} max_wal_senders free")
        return Check(
            "wal senders",
            "fail",
            f"all {limit} max_wal_senders are busy; Debezium needs one",
            f"ALTER SYSTEM SET max_wal_senders = {limit + 1}; then restart PostgreSQL",
        )

    def _replication_role(self, conn: Conn) -> Check:
        row = conn.execute("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row is not None
        if row[1]:
            return Check("replication role", "ok", f"{self.user} is a superuser")
        if row[0]:
            return Check("replication role", "ok", f"{self.user} has REPLICATION")
        managed = [
            str(r[0])
            for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) AND pg_has_role(current_user, oid, 'MEMBER')",
                (list(MANAGED_REPLICATION_ROLES),),
            )
        ]
        if managed:
            return Check("replication role", "ok", f"{self.user} is a member of {managed[0]}")
        exists = [
            str(r[0])
            for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(MANAGED_REPLICATION_ROLES),)
            )
        ]
        who = _quote(self.user)
        fix = f"GRANT {exists[0]} TO {who};" if exists else f"ALTER ROLE {who} WITH REPLICATION;"
        return Check("replication role", "fail", f"role {self.user} may not stream changes (no REPLICATION)", fix)

    def _wal_keep_size(self, conn: Conn) -> Check:
        value = str(_one(conn, "SHOW max_slot_wal_keep_size"))
        if value != "-1":
            return Check("max_slot_wal_keep_size", "ok", f"{value}: a stalled slot cannot fill the disk")
        return Check(
            "max_slot_wal_keep_size",
            "warn",
            "-1 (unlimited): while the pipeline is down the slot keeps WAL until the disk is full",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();",
        )

    def _control_schema(self, conn: Conn) -> Check:
        schema, db = pgsetup.CONTROL_SCHEMA, self.s.postgres.database
        if not self.s.postgres.source_writes:
            return Check(
                "control tables",
                "warn",
                "read-only source (postgres.source_writes=false): no canary freshness, no heartbeat (the slot may "
                "hold WAL while the indexed tables are idle, up to max_slot_wal_keep_size), tables added later are "
                "read with verify --repair",
            )
        owner = _one(
            conn,
            "SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = %s",
            (schema,),
        )
        if owner:
            return Check("control tables", "ok", f"schema {schema} exists and {self.user} owns it")
        if owner is None and _one(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
            return Check("control tables", "ok", f"{self.user} may create schema {schema}")
        if owner is not None and self._may_write_control_tables(conn):
            return Check("control tables", "ok", f"schema {schema} prepared by its owner; {self.user} may write it")
        why = (
            f"schema {schema} exists but {self.user} may not write all of {', '.join(pgsetup.CONTROL_TABLES)}"
            if owner is not None
            else f"{self.user} cannot create schema {schema}"
        )
        return Check(
            "control tables",
            "fail",
            f"{why} (heartbeat, canary and signal tables)",
            f"as the database owner: {pgsetup.control_script(_quote(self.user))} or GRANT CREATE ON DATABASE "
            f"{_quote(db)} TO {_quote(self.user)}; or run read-only: RAGTIDE_POSTGRES__SOURCE_WRITES=false",
        )

    def _may_write_control_tables(self, conn: Conn) -> bool:
        for table in pgsetup.CONTROL_TABLES:
            if _one(conn, "SELECT to_regclass(%s)", (table,)) is None:
                return False
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                if not _one(conn, "SELECT has_table_privilege(%s, %s)", (table, privilege)):
                    return False
        return True

    # -- tables ------------------------------------------------------------------------------------------------

    def _table_checks(self, conn: Conn) -> list[Check]:
        checks: list[Check] = []
        for src in self.sources.sources:
            if src.table == CANARY_TABLE and self.s.postgres.source_writes and not self._exists(conn, src.table):
                continue  # ragtide creates it (control tables check); once it exists it is checked like the rest
            checks.append(self._table(conn, src))
        return checks

    def _exists(self, conn: Conn, table: str) -> bool:
        return _one(conn, "SELECT to_regclass(%s)", (_ident(table),)) is not None

    def _table(self, conn: Conn, src: SourceTable) -> Check:
        t, name = src.table, f"table {src.table}"
        if not self._exists(conn, t):
            return Check(name, "fail", "does not exist (or is not visible to this role)", _grant_usage(t, self.user))
        if _one(conn, "SELECT relkind FROM pg_class WHERE oid = %s::regclass", (_ident(t),)) == "p":
            return Check(
                name,
                "fail",
                "is a partitioned table: its changes are published under its partitions' names, which are not indexed",
                f"index its partitions as tables of their own, or leave {t} out of the sources file",
            )
        if not _one(conn, "SELECT has_table_privilege(%s, 'SELECT')", (_ident(t),)):
            return Check(name, "fail", f"{self.user} may not read it", f"GRANT SELECT ON {t} TO {_quote(self.user)};")
        key = pgsetup.primary_key(conn, t)
        if not key:
            return Check(
                name,
                "fail",
                "has no primary key: updates and deletes could not be matched to indexed rows",
                f"ALTER TABLE {t} ADD PRIMARY KEY (<unique, not-null columns>); or leave it out of the sources file",
            )
        if key != src.key:
            return Check(
                name,
                "fail",
                f"key is {list(src.key)} in the sources file but the primary key is {list(key)}",
                f"set key: {list(key)} for {t} in {self.s.sources_file}",
            )
        columns = {
            str(r[0]): (str(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT attname, attstorage, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (_ident(t),),
            )
        }
        wanted = [*src.text_columns, *src.metadata, *([src.tenant_column] if src.tenant_column else [])]
        missing = [c for c in wanted if c not in columns]
        if missing:
            return Check(
                name,
                "fail",
                f"column {missing[0]} (named in the sources file) does not exist; columns: {', '.join(columns)}",
                f"fix text/metadata/tenant_column of {t} in {self.s.sources_file}",
            )
        identity = str(_one(conn, "SELECT relreplident FROM pg_class WHERE oid = %s::regclass", (_ident(t),)))
        if identity in ("n", "i"):
            what = "NOTHING: deletes carry no key" if identity == "n" else "USING INDEX: deletes carry that index's "
            return Check(
                name,
                "fail",
                f"REPLICA IDENTITY {what}{'columns, not the primary key' if identity == 'i' else ''}",
                f"ALTER TABLE {t} REPLICA IDENTITY DEFAULT;",
            )
        rows = _one(conn, "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (_ident(t),))
        size = f"~{rows} rows" if rows is not None and rows >= 0 else "not analyzed yet"
        # Under the default identity an unchanged TOASTed column arrives as Debezium's placeholder; the writer keeps
        # the indexed value (text, metadata and tenant columns alike), so REPLICA IDENTITY FULL and its WAL cost
        # are not needed.
        toastable = [c for c in wanted if columns[c][0] in "xe"]
        toast = f"; TOASTable {', '.join(toastable)} kept from the index when unchanged" if toastable else ""
        return Check(name, "ok", f"key {list(key)}, readable, {size}{toast}")

    def _publication(self, conn: Conn) -> Check:
        pub = self.s.connect.publication
        tables = pgsetup.publication_tables(self.s, self.sources)
        owner_fix = f"as the tables' owner: CREATE PUBLICATION {pub} FOR TABLE {', '.join(tables)};" + (
            " (after the control tables check passes)" if self.s.postgres.source_writes else ""
        )
        row = conn.execute(
            "SELECT puballtables, pg_has_role(current_user, pubowner, 'USAGE'), pubinsert AND pubupdate AND pubdelete "
            "AND pubtruncate FROM pg_publication WHERE pubname = %s",
            (pub,),
        ).fetchone()
        if row is None:
            can_create = _one(conn, "SELECT has_database_privilege(current_database(), 'CREATE')")
            if can_create and self._owns_all(conn, tables):
                return Check("publication", "ok", f"{pub} does not exist yet; Debezium creates it")
            return Check(
                "publication",
                "fail",
                f"{pub} does not exist and {self.user} may not create it (it must own the tables)",
                owner_fix,
            )
        if not row[2]:
            return Check(
                "publication",
                "fail",
                f"{pub} does not publish every kind of change (deletes or truncates would never reach the index)",
                f"ALTER PUBLICATION {pub} SET (publish = 'insert, update, delete, truncate');",
            )
        restricted = self._restricted(conn, pub, tables)
        if restricted:
            return Check(
                "publication",
                "fail",
                f"{pub} publishes {restricted} only in part (a column list or a row filter): changes would be lost",
                f"ALTER PUBLICATION {pub} SET TABLE {', '.join(tables)};",
            )
        absent = pgsetup.unpublished(conn, pub, tables) or []
        if not absent:
            return Check("publication", "ok", f"{pub} exists and publishes every indexed table (reused as is)")
        # Debezium sets the publication's whole table list (ALTER PUBLICATION ... SET TABLE): it must own them all.
        if row[1] and self._owns_all(conn, tables):
            return Check("publication", "ok", f"{pub} exists; Debezium adds {', '.join(absent)}")
        return Check(
            "publication",
            "fail",
            f"{pub} does not publish {', '.join(absent)} and {self.user} may not add them",
            f"as the tables' owner: ALTER PUBLICATION {pub} ADD TABLE {', '.join(absent)};",
        )

    def _restricted(self, conn: Conn, pub: str, tables: list[str]) -> str | None:
        """The first of `tables` that the publication carries with a column list or a row filter (PostgreSQL 15+)."""
        if int(_one(conn, "SHOW server_version_num")) < 150000:
            return None
        rows = conn.execute(
            "SELECT p.schemaname || '.' || p.tablename, p.rowfilter IS NOT NULL, "
            "cardinality(p.attnames) < (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = "
            "(quote_ident(p.schemaname) || '.' || quote_ident(p.tablename))::regclass AND a.attnum > 0 "
            "AND NOT a.attisdropped) FROM pg_publication_tables p WHERE p.pubname = %s",
            (pub,),
        ).fetchall()
        return next((str(t) for t, filtered, partial in rows if t in tables and (filtered or partial)), None)

    def _owns_all(self, conn: Conn, tables: list[str]) -> bool:
        if _one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            return True
        for t in tables:
            owned = _one(
                conn,
                "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = to_regclass(%s)",
                (_ident(t),),
            )
            if owned is None and t.startswith(pgsetup.CONTROL_SCHEMA + "."):
                continue  # not created yet: ragtide creates it, and then owns it
            if not owned:
                return False
        return True

    def _state(self) -> Check:
        pg = self.s.postgres
        where = "state_dsn" if pg.state_dsn else "the source database"
        try:
            with psycopg.connect(pg.state(), autocommit=True, connect_timeout=5) as conn:
                schemas = list(pgsetup.STATE_SCHEMAS)
                present = {
                    str(r[0]): bool(r[1])
                    for r in conn.execute(
                        "SELECT nspname, pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace "
                        "WHERE nspname = ANY(%s)",
                        (schemas,),
                    )
                }
                can_create = _one(conn, "SELECT has_database_privilege(current_database(), 'CREATE')")
                database = str(_one(conn, "SELECT current_database()"))
                user = str(_one(conn, "SELECT current_user"))
        except psycopg.OperationalError as exc:
            return Check("state", "fail", f"cannot connect to {where}: {str(exc).strip()}", "check postgres.state_dsn")
        blocked = [s for s in schemas if (s in present and not present[s]) or (s not in present and not can_create)]
        if not blocked:
            return Check("state", "ok", f"gateway keys and truncate watermarks in {where} ({', '.join(schemas)})")
        return Check(
            "state",
            "fail",
            f"{user} cannot create or use schema {blocked[0]} in {where} (gateway keys, truncate watermarks)",
            f"GRANT CREATE ON DATABASE {database} TO {user}; or keep ragtide's state in another Postgres: "
            "RAGTIDE_POSTGRES__STATE_DSN=postgresql://...",
        )

    # -- Connect ------------------------------------------------------------------------------------------------

    def _from_connect(self) -> Check:
        """Connect validates the connector config, which connects to the database from where Connect runs."""
        from ragtide.ingest.connector import connector_config

        url = f"{self.s.connect.url}/connector-plugins/PostgresConnector/config/validate"
        try:
            config = {"name": self.s.connect.connector_name, **connector_config(self.s, self.sources)}
            resp = httpx.put(url, json=config, timeout=60)
        except httpx.TransportError:
            return Check(
                "reachable from Connect",
                "ok",
                f"not checked: Connect is not running at {redact_dsn(self.s.connect.url)} (checked when `up` registers "
                "the connector)",
            )
        if resp.status_code >= 400:
            return Check("reachable from Connect", "fail", f"Connect answered {resp.status_code}: {resp.text[:300]}")
        errors = [
            f"{c['value']['name']}: {e}" for c in resp.json().get("configs", []) for e in c["value"].get("errors", [])
        ]
        if errors:
            return Check(
                "reachable from Connect",
                "fail",
                f"Connect cannot use the database: {errors[0]}",
                "make the database reachable from the Connect workers (host, port, pg_hba.conf, security groups)",
            )
        return Check(
            "reachable from Connect", "ok", f"Connect at {redact_dsn(self.s.connect.url)} connects to the database"
        )


def _connect_fix(reason: str) -> str:
    if "password authentication failed" in reason or "no password supplied" in reason:
        return "check the user and password in the DSN"
    if "no pg_hba.conf entry" in reason:
        return "add a pg_hba.conf line for this host, user and database, then SELECT pg_reload_conf();"
    if "does not exist" in reason:
        return "check the database name in the DSN"
    return "check host and port in the DSN, and that the server accepts TCP connections from here (listen_addresses)"


def _grant_usage(table: str, user: str) -> str:
    schema = table.split(".")[0]
    return f"check the name; GRANT USAGE ON SCHEMA {schema} TO {user}; GRANT SELECT ON {table} TO {user};"


def diagnose(settings: RagtideSettings, sources: SourcesConfig, connect_check: bool = True) -> Report:
    """Run every check."""
    return Doctor(settings, sources).run(connect_check)
