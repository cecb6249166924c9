"""A user's own database, as the README tells a user to index it: a PostgreSQL cluster apart from anything
`ragtide up` manages (its own port and data folder, wal_level=logical), a role with only LOGIN REPLICATION and
SELECT on two tables (one with a composite key, one with a TOASTed column), a publication created by the owner,
and ragtide's state in another database. `ragtide init` writes the config, `ragtide doctor` passes, `up` starts
no Postgres and indexes both tables, changes stream, and `down --drop-slot` leaves no slot behind."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from ragtide.cli import app
from ragtide.contracts.settings import RagtideSettings
from ragtide.ingest.doctor import diagnose
from ragtide.ingest.sources import sources_of
from ragtide.ingest.uninstall import uninstall_source
from ragtide.stack.stack import Stack
from tests.e2e.conftest import own_stack_settings, poll, search, stopped_after
from tests.sourcedb import SourceDB, source_db

BIG = "SELECT string_agg(md5(i::text), ' ') FROM generate_series(1, 700) i"  # ~23 kB of incompressible text


def shop(db: SourceDB) -> None:
    """The user's schema: what their DBA would have set up, following the README."""
    db.sql("CREATE SCHEMA shop")
    db.sql("CREATE TABLE shop.articles (id int PRIMARY KEY, title text, body text, lang varchar(8))")
    db.sql(
        "CREATE TABLE shop.reviews (product_id int, review_no int, body text, stars int, "
        "PRIMARY KEY (product_id, review_no))"
    )
    db.sql(
        f"INSERT INTO shop.articles SELECT i, 'Article ' || i, CASE WHEN i = 1 THEN ({BIG}) ELSE "
        "'The zeppelin mooring mast stood on the roof of building ' || i END, 'l' || (i % 2) "
        "FROM generate_series(1, 30) i"
    )
    db.sql(
        "INSERT INTO shop.reviews SELECT p, r, 'Review ' || r || ' of product ' || p || ': sturdy hinges, quiet fan', "
        "1 + (p + r) % 5 FROM generate_series(1, 10) p, generate_series(1, 3) r"
    )
    db.sql("CREATE TABLE shop.audit (at timestamptz, line text)")  # no primary key: init leaves it out
    db.sql("CREATE ROLE indexer LOGIN REPLICATION")
    db.sql("GRANT USAGE ON SCHEMA shop TO indexer")
    db.sql("GRANT SELECT ON shop.articles, shop.reviews, shop.audit TO indexer")
    db.sql("CREATE PUBLICATION ragtide_pub FOR TABLE shop.articles, shop.reviews")
    db.sql("CREATE DATABASE ragtide_state")


@pytest.fixture(scope="module")
def own() -> Iterator[tuple[SourceDB, RagtideSettings]]:
    with source_db(max_slot_wal_keep_size="1GB") as db:
        shop(db)
        settings = own_stack_settings(
            "ragtide-own-",
            [],
            postgres={
                "dsn": db.dsn("indexer"),
                "source_writes": False,
                "state_dsn": f"postgresql://postgres@127.0.0.1:{db.port}/ragtide_state",
            },
            generator={"local": False},
        )
        with stopped_after(settings):
            yield db, settings


def test_init_doctor_up_stream_and_drop_slot(own: tuple[SourceDB, RagtideSettings]) -> None:
    db, s = own
    env = s.to_env()
    cli = CliRunner()

    # init: lists the tables, leaves shop.audit out with the reason, writes the sources file up will use
    result = cli.invoke(app, ["init", "--dsn", db.dsn("indexer"), "--all", "--force"], env=env)
    assert result.exit_code == 0, result.output
    assert "left out shop.audit: no primary key" in " ".join(result.output.split())
    sources = sources_of(s)
    assert sources.tables == ["shop.articles", "shop.reviews"]  # no canary: a read-only source
    assert sources.get("shop.reviews").key == ("product_id", "review_no")  # type: ignore[union-attr]
    assert sources.get("shop.articles").metadata == ("lang",)  # type: ignore[union-attr]

    result = cli.invoke(app, ["doctor"], env=env)
    assert result.exit_code == 0, result.output
    assert "✓ publication: ragtide_pub exists and publishes every indexed table (reused as is)" in result.output

    # `make up SOURCE_DSN=...` runs this: the doctor first, no local Postgres, then wait until indexed and ready
    result = cli.invoke(app, ["up"], env=env)
    assert result.exit_code == 0, result.output
    assert "source database checked (ragtide doctor)" in result.output and "ragtide is up" in result.output
    stack = Stack(s)
    assert stack.daemon("postgres").pid() is None  # no local Postgres
    assert diagnose(s, sources).checks[-1].detail.startswith("Connect at ")  # reachable from Connect itself

    def indexed(table: str, rows: int) -> bool:
        stats = httpx.get(f"{s.api.url}/v1/index/stats", timeout=10).json()
        return bool(stats["tables"].get(table, {}).get("rows", 0) >= rows)

    poll(lambda: indexed("shop.articles", 30) and indexed("shop.reviews", 30), "both tables indexed", 300)
    stack.wait_ready()
    assert search(s, "zeppelin mooring mast", lang="l0")[0]["metadata"]["lang"] == "l0"

    # changes stream: an update that leaves the TOASTed body unchanged keeps it; composite keys update and delete
    big_start = db.sql(BIG)[0][0][:32]
    db.sql("UPDATE shop.articles SET title = 'Quokka field guide' WHERE id = 1")
    db.sql(
        "UPDATE shop.reviews SET body = 'Review of a solar kettle that boils in the dark' WHERE product_id = 7 "
        "AND review_no = 2"
    )
    db.sql("DELETE FROM shop.reviews WHERE product_id = 3 AND review_no = 1")

    def toast_kept() -> bool:
        hits = search(s, "Quokka field guide")
        return bool(hits) and hits[0]["row_id"] == "1" and big_start in hits[0]["text"]

    poll(toast_kept, "the new title, with the unchanged TOASTed body kept")
    poll(lambda: search(s, "solar kettle boils in the dark")[0]["row_id"] == "7|2", "the updated review")
    poll(lambda: indexed("shop.reviews", 29) and not indexed("shop.reviews", 30), "the deleted review gone")

    dropped = stack.down(drop_slot=True)
    assert "dropped replication slot ragtide_slot" in dropped
    assert db.sql("SELECT slot_name FROM pg_replication_slots") == []

    removal = uninstall_source(s)
    assert removal.for_owner == ["DROP PUBLICATION ragtide_pub;"]  # the owner created it; the role may not drop it
    assert "dropped schema ragtide_gateway" in removal.done
    assert db.sql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'ragtide%%'", user="postgres") == [(0,)]
