"""A second source database beside the first: its own connector, slot and topics, its tables searchable with
the first's and filterable on their own with {"database": ...}, even where both hold a table of the same name;
`down --drop-slot` drops the slots of both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from ragtide.contracts.settings import RagtideSettings
from ragtide.stack.stack import Stack
from tests.e2e.conftest import own_stack_settings, poll, search, stopped_after
from tests.sourcedb import SourceDB, source_db

DOCS = "CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text, topic text, category text)"


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[RagtideSettings, SourceDB]]:
    with source_db("billing") as billing:
        billing.sql(DOCS)  # the same table name as the first database's demo table
        billing.sql(
            "INSERT INTO public.docs VALUES (1, 'Invoice dunning', 'Overdue invoices get three reminder emails "
            "before the account is paused', 'billing', 'ops')"
        )
        settings = own_stack_settings("ragtide-twodb-", [], generator={"local": False})
        config = yaml.safe_load(settings.sources_file.read_text())
        config["databases"] = {
            "billing": {
                "dsn": "${RAGTIDE_TEST_BILLING_DSN}",
                "sources": [
                    {"table": "public.docs", "key": ["id"], "text": "{title}\n\n{body}", "metadata": ["topic"]}
                ],
            }
        }
        settings.sources_file.write_text(yaml.safe_dump(config))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAGTIDE_TEST_BILLING_DSN", billing.dsn())  # ${VAR} in the sources file, as a secret would be
            with stopped_after(settings):
                yield settings, billing


def test_two_databases_are_searched_together_and_apart(two: tuple[RagtideSettings, SourceDB]) -> None:
    s, billing = two
    stack = Stack(s)
    stack.up()
    with psycopg.connect(s.postgres.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.docs VALUES (1, 'Reminder emails', 'Product reminder emails are sent to inactive "
            "users after a week', 'mail', 'ops')"
        )

    def tables_of(hits: list[dict[str, Any]]) -> set[str]:
        return {h["table"] for h in hits}

    poll(lambda: tables_of(search(s, "reminder emails")) == {"public.docs", "billing.public.docs"}, "both databases")
    assert tables_of(search(s, "reminder emails", database="billing")) == {"billing.public.docs"}
    assert tables_of(search(s, "reminder emails", database=s.postgres.database)) == {"public.docs"}
    resp = httpx.post(f"{s.api.url}/v1/search", json={"query": "x", "filter": {"database": "nope"}}, timeout=30)
    assert resp.status_code == 422 and "database 'nope' is not indexed" in resp.text

    billing.sql("UPDATE public.docs SET body = 'Overdue invoices are sent to a collections agency' WHERE id = 1")
    poll(
        lambda: "collections agency" in search(s, "collections agency", database="billing")[0]["text"],
        "a change in the second database",
    )
    assert "inactive users" in search(s, "reminder emails", database=s.postgres.database)[0]["text"]  # untouched

    slots = sorted(r[0] for r in billing.sql("SELECT slot_name FROM pg_replication_slots"))
    assert slots == ["ragtide_slot_billing"]
    dropped = stack.down(drop_slot=True)
    assert "dropped replication slot ragtide_slot_billing" in dropped
    assert billing.sql("SELECT slot_name FROM pg_replication_slots") == []
