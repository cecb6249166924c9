"""A table added to the sources while the pipeline runs gets its existing rows through Debezium's incremental
snapshot (signal table), and its new changes through the stream, without stopping the stream for others.
The table has a composite primary key, and ends with a TRUNCATE."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import yaml

from ragtide.stack.stack import Stack
from tests.e2e.conftest import LiveStack, poll


def test_new_table_is_backfilled_by_incremental_snapshot_and_then_streamed(live: LiveStack) -> None:
    live.sql("CREATE TABLE IF NOT EXISTS public.field_notes (site text, id int, note text, PRIMARY KEY (site, id))")
    live.sql(
        "INSERT INTO public.field_notes VALUES ('north', 1, 'Puffins nest in burrows on the cliff top'),"
        " ('south', 1, 'Seals haul out on the sandbar at low tide'), ('east', 1, 'Terns dive for sand eels')"
        " ON CONFLICT DO NOTHING"
    )
    config = yaml.safe_load(live.settings.sources_file.read_text())
    config["sources"].append(
        {"table": "public.field_notes", "key": ["site", "id"], "text": "{note}", "metadata": ["site"]}
    )
    path = Path(tempfile.mkdtemp(prefix="ragtide-sources-")) / "sources.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = live.settings.model_copy(update={"sources_file": path})
    stack = Stack(settings)

    added = stack.apply_sources()
    assert added == ["public.field_notes"]
    stack.wait_ready()

    def backfilled() -> list[str]:
        hits = live.search("seabirds and seals on the coast", k=10, flt={"table": "public.field_notes"})
        ids = sorted(h["row_id"] for h in hits)
        return ids if ids == ["east|1", "north|1", "south|1"] else []

    poll(backfilled, "the existing rows of the new table (incremental snapshot)", timeout=180)
    assert live.metric("ragtide_backfill_rows_total", table="public.field_notes") >= 3
    marker = uuid.uuid4().hex[:6]
    live.sql("INSERT INTO public.field_notes VALUES ('west', 1, %s)", (f"Gannets plunge-dive {marker}",))
    poll(
        lambda: any(
            h["row_id"] == "west|1"
            for h in live.search(
                f"gannets plunge dive {marker}", k=5, flt={"table": "public.field_notes", "site": "west"}
            )
        ),
        "a new row of the new table (streaming)",
    )
    # the other table kept streaming throughout
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'Still', 'docs keep flowing', %s,"
        " 'e2e')",
        (f"{topic}/1", topic),
    )
    poll(lambda: live.search("docs keep flowing", k=3, flt={"topic": topic}), "docs to keep streaming")
    # TRUNCATE empties the table's part of the index, and only that part
    live.sql("TRUNCATE public.field_notes")
    poll(lambda: live.search("seabirds and seals", k=10, flt={"table": "public.field_notes"}) == [], "the truncate")
    assert live.search("docs keep flowing", k=3, flt={"topic": topic})
    # back to the original sources for the tests that follow
    live.stack.daemon("node").stop(timeout=60)
    live.stack.start_node()
    live.stack.wait_ready()
