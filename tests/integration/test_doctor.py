"""`ragtide doctor` against real PostgreSQL clusters that each have one exact problem: the check fails with its
cause and prints the fix. The fix is then applied and the same check passes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.ingest.doctor import Report, diagnose
from ragtide.ingest.sources import SourcesConfig, SourceTable
from tests.sourcedb import SourceDB, source_db

SOURCES = SourcesConfig(
    sources=(
        SourceTable(table="shop.products", key=("id",), text="{name}\n\n{description}", metadata=("category",)),
        SourceTable(table="shop.reviews", key=("product_id", "review_no"), text="{body}"),
    )
)


def setup_shop(db: SourceDB) -> None:
    """Two tables and a least-privileged role: LOGIN REPLICATION plus SELECT on them."""
    db.sql("CREATE SCHEMA shop")
    db.sql("CREATE TABLE shop.products (id int PRIMARY KEY, name text, description text, category text)")
    db.sql("CREATE TABLE shop.reviews (product_id int, review_no int, body text, PRIMARY KEY (product_id, review_no))")
    db.sql("CREATE ROLE indexer LOGIN REPLICATION")
    db.sql("GRANT USAGE ON SCHEMA shop TO indexer")
    db.sql("GRANT SELECT ON shop.products, shop.reviews TO indexer")
    db.sql("CREATE PUBLICATION ragtide_pub FOR TABLE shop.products, shop.reviews")


def settings_for(
    db: SourceDB, user: str = "indexer", connect: dict[str, object] | None = None, **postgres: object
) -> RagtideSettings:
    return load_settings(
        RagtideSettings,
        postgres={"dsn": db.dsn(user), "source_writes": False, "state_dsn": db.dsn("postgres"), **postgres},
        connect=connect or {"port": 1},  # no Connect: that check says "not checked"
    )


def check(report: Report, name: str) -> tuple[str, str, str]:
    found = [c for c in report.checks if c.name == name]
    assert found, f"no check {name!r} in:\n{report.text()}"
    return found[0].status, found[0].detail, found[0].fix


@pytest.fixture(scope="module")
def logical() -> Iterator[SourceDB]:
    with source_db(max_replication_slots="2") as db:
        setup_shop(db)
        yield db


def test_a_least_privileged_role_on_a_well_configured_database_passes(logical: SourceDB) -> None:
    report = diagnose(settings_for(logical), SOURCES)
    assert report.ok, report.text()
    assert check(report, "table shop.reviews")[0] == "ok"
    assert "product_id" in check(report, "table shop.reviews")[1]
    assert "reused as is" in check(report, "publication")[1]
    assert check(report, "reachable from Connect")[1].startswith("not checked")


def test_wal_level_replica() -> None:
    with source_db(wal_level="replica", max_wal_senders="10") as db:
        setup_shop(db)
        report = diagnose(settings_for(db), SOURCES, connect_check=False)
    status, detail, fix = check(report, "wal_level")
    assert (status, detail) == ("fail", "replica: logical decoding needs wal_level=logical")
    assert fix.startswith("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
    assert not report.ok


def test_a_role_without_replication(logical: SourceDB) -> None:
    logical.sql("CREATE ROLE plain LOGIN")
    logical.sql("GRANT USAGE ON SCHEMA shop TO plain")
    logical.sql("GRANT SELECT ON shop.products, shop.reviews TO plain")
    report = diagnose(settings_for(logical, "plain"), SOURCES, connect_check=False)
    status, detail, fix = check(report, "replication role")
    assert (status, detail, fix) == (
        "fail",
        "role plain may not stream changes (no REPLICATION)",
        "ALTER ROLE plain WITH REPLICATION;",
    )
    logical.sql("ALTER ROLE plain WITH REPLICATION")  # the fix, applied
    assert check(diagnose(settings_for(logical, "plain"), SOURCES, connect_check=False), "replication role")[0] == "ok"


def test_a_table_without_a_primary_key(logical: SourceDB) -> None:
    logical.sql("CREATE TABLE shop.notes (id int, body text)")
    logical.sql("GRANT SELECT ON shop.notes TO indexer")
    sources = SourcesConfig(sources=(*SOURCES.sources, SourceTable(table="shop.notes", key=("id",), text="{body}")))
    report = diagnose(settings_for(logical), sources, connect_check=False)
    status, detail, fix = check(report, "table shop.notes")
    assert status == "fail"
    assert detail == "has no primary key: updates and deletes could not be matched to indexed rows"
    assert fix.startswith("ALTER TABLE shop.notes ADD PRIMARY KEY (")
    assert check(report, "table shop.products")[0] == "ok"


def test_a_partitioned_table(logical: SourceDB) -> None:
    logical.sql("CREATE TABLE shop.events (id int, at date, body text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    logical.sql("GRANT SELECT ON shop.events TO indexer")
    sources = SourcesConfig(sources=(SourceTable(table="shop.events", key=("id", "at"), text="{body}"),))
    status, detail, fix = check(diagnose(settings_for(logical), sources, connect_check=False), "table shop.events")
    assert status == "fail" and detail.startswith("is a partitioned table")
    assert fix == "index its partitions as tables of their own, or leave shop.events out of the sources file"


def test_the_canary_table_once_it_exists_is_checked_like_the_rest(logical: SourceDB) -> None:
    logical.sql("CREATE SCHEMA ragtide")
    logical.sql("CREATE TABLE ragtide.canary (id int, body text, ts timestamptz)")  # made by hand, no primary key
    logical.sql("GRANT USAGE ON SCHEMA ragtide TO indexer")
    logical.sql("GRANT SELECT ON ragtide.canary TO indexer")
    try:
        report = diagnose(settings_for(logical), SOURCES.with_canary(), connect_check=False)
        assert check(report, "table ragtide.canary")[:2] == (
            "fail",
            "has no primary key: updates and deletes could not be matched to indexed rows",
        )
    finally:
        logical.sql("DROP SCHEMA ragtide CASCADE")
    assert not [c for c in diagnose(settings_for(logical), SOURCES, connect_check=False).checks if "canary" in c.name]


def test_no_free_replication_slot(logical: SourceDB) -> None:
    logical.sql("SELECT pg_create_logical_replication_slot('other_a', 'pgoutput')")
    logical.sql("SELECT pg_create_logical_replication_slot('other_b', 'pgoutput')")
    try:
        report = diagnose(settings_for(logical), SOURCES, connect_check=False)
    finally:
        logical.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    status, detail, fix = check(report, "replication slots")
    assert status == "fail"
    assert detail == (
        "all 2 max_replication_slots are taken (other_a, other_b); ragtide needs one for slot ragtide_slot"
    )
    assert fix == (
        "ALTER SYSTEM SET max_replication_slots = 3; then restart PostgreSQL; "
        "or drop an unused one: SELECT pg_drop_replication_slot('other_a');"
    )


def test_missing_select_and_publication_and_state(logical: SourceDB) -> None:
    logical.sql("CREATE ROLE reader LOGIN REPLICATION")
    logical.sql("GRANT USAGE ON SCHEMA shop TO reader")
    logical.sql("GRANT SELECT ON shop.products TO reader")
    s = settings_for(logical, "reader", state_dsn=None, source_writes=True)
    report = diagnose(s, SOURCES.with_canary(), connect_check=False)
    assert check(report, "table shop.reviews") == (
        "fail",
        "reader may not read it",
        "GRANT SELECT ON shop.reviews TO reader;",
    )
    status, detail, fix = check(report, "control tables")
    assert status == "fail" and detail.startswith("reader cannot create schema ragtide")
    assert fix.startswith("as the database owner: CREATE SCHEMA IF NOT EXISTS ragtide;")
    assert "GRANT CREATE ON DATABASE shop TO reader;" in fix and "RAGTIDE_POSTGRES__SOURCE_WRITES=false" in fix
    status, detail, fix = check(report, "publication")
    assert status == "fail"
    assert "ragtide_pub does not publish ragtide.canary, ragtide.debezium_signal" in detail
    assert (
        fix == "as the tables' owner: ALTER PUBLICATION ragtide_pub ADD TABLE ragtide.canary, ragtide.debezium_signal;"
    )
    assert check(report, "state")[0] == "fail"
    assert "RAGTIDE_POSTGRES__STATE_DSN" in check(report, "state")[2]

    # The owner runs the printed fixes: the control schema is prepared for the role, the publication extended.
    script = fix_of(report, "control tables").removeprefix("as the database owner: ").split(" or GRANT CREATE")[0]
    logical.sql(script)
    logical.sql("ALTER PUBLICATION ragtide_pub ADD TABLE ragtide.canary, ragtide.debezium_signal")
    try:
        again = diagnose(s, SOURCES.with_canary(), connect_check=False)
        assert check(again, "control tables")[:2] == ("ok", "schema ragtide prepared by its owner; reader may write it")
        assert check(again, "publication")[0] == "ok"
    finally:
        logical.sql("ALTER PUBLICATION ragtide_pub DROP TABLE ragtide.canary, ragtide.debezium_signal")
        logical.sql("DROP SCHEMA ragtide CASCADE")


def fix_of(report: Report, name: str) -> str:
    return check(report, name)[2]


def test_a_publication_that_leaves_changes_out(logical: SourceDB) -> None:
    logical.sql(
        "CREATE PUBLICATION partial_pub FOR TABLE shop.products, shop.reviews WITH (publish = 'insert, update')"
    )
    logical.sql("CREATE PUBLICATION narrow_pub FOR TABLE shop.products (id, name), shop.reviews")
    try:
        s = settings_for(logical, connect={"port": 1, "publication": "partial_pub"})
        status, detail, fix = check(diagnose(s, SOURCES, connect_check=False), "publication")
        assert status == "fail" and "deletes or truncates would never reach the index" in detail
        assert fix == "ALTER PUBLICATION partial_pub SET (publish = 'insert, update, delete, truncate');"
        s = settings_for(logical, connect={"port": 1, "publication": "narrow_pub"})
        status, detail, fix = check(diagnose(s, SOURCES, connect_check=False), "publication")
        assert status == "fail" and detail.startswith("narrow_pub publishes shop.products only in part")
        assert fix == "ALTER PUBLICATION narrow_pub SET TABLE shop.products, shop.reviews;"
    finally:
        logical.sql("DROP PUBLICATION partial_pub")
        logical.sql("DROP PUBLICATION narrow_pub")


def test_an_unreachable_database_is_one_line() -> None:
    s = load_settings(RagtideSettings, postgres={"dsn": "postgresql://indexer@127.0.0.1:1/shop"})
    report = diagnose(s, SOURCES, connect_check=False)
    assert [c.name for c in report.checks] == ["connection"]
    assert report.checks[0].status == "fail"
    assert report.checks[0].detail.startswith("cannot connect to 127.0.0.1:1/shop as indexer: ")
    assert "Traceback" not in report.text()
