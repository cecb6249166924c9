"""`ragtide init` against a real database: tables with their keys, text and low-cardinality columns; a table
without a primary key is listed with the reason and never proposed; the written file loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragtide.cli import app
from ragtide.contracts.errors import ConfigError
from ragtide.ingest.discover import discover, propose
from ragtide.ingest.sources import load_sources
from tests.sourcedb import source_db


def test_init_proposes_a_config_for_the_picked_tables(tmp_path: Path) -> None:
    with source_db() as db:
        db.sql("CREATE SCHEMA shop")
        db.sql(
            "CREATE TABLE shop.products (id int PRIMARY KEY, org text, name text, description text, "
            "category varchar(20), price int)"
        )
        db.sql(
            "INSERT INTO shop.products SELECT i, 'org' || (i % 2), 'name ' || i, "
            "repeat('some longer words ', i % 7 + 4), 'cat' || (i % 3), i FROM generate_series(1, 60) i"
        )
        db.sql("CREATE TABLE shop.log (at timestamptz, line text)")
        db.sql("CREATE TABLE shop.secrets (id int PRIMARY KEY, token text)")
        db.sql("CREATE ROLE indexer LOGIN REPLICATION")
        db.sql("GRANT USAGE ON SCHEMA shop TO indexer")
        db.sql("GRANT SELECT ON shop.products, shop.log TO indexer")
        dsn = db.dsn("indexer")

        found = {t.table: t for t in discover(dsn)}
        assert set(found) == {"shop.products", "shop.log", "shop.secrets"}
        assert found["shop.secrets"].skipped == (
            "this role may not read it (GRANT SELECT ON shop.secrets TO <role>; to index it)"
        )
        products = found["shop.products"]
        assert products.key == ("id",) and products.rows == 60
        assert products.text_columns == ["name", "description"]
        assert products.metadata_columns == ["org", "category"]  # 2 and 3 distinct values; price has 60
        assert found["shop.log"].skipped == "no primary key (ALTER TABLE shop.log ADD PRIMARY KEY (...) to index it)"
        with pytest.raises(ConfigError, match=r"shop\.log cannot be indexed: no primary key"):
            propose(list(found.values()), ["shop.log"])

        out = tmp_path / "sources.yaml"
        result = CliRunner().invoke(
            app, ["init", "--dsn", dsn, "--table", "shop.products", "--tenant-column", "org", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert "left out shop.log: no primary key" in " ".join(result.output.split())
    (src,) = load_sources(out, canary=False).sources
    assert (src.table, src.key, src.text, src.metadata, src.tenant_column) == (
        "shop.products",
        ("id",),
        "{name}\n\n{description}",
        ("category",),
        "org",
    )
