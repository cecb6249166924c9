"""`ragtide dlq`: the dead-letter topic, what could not be indexed and why."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from ragtide.cli.common import app, console, current_settings

dlq_app = typer.Typer(help="The dead-letter topic: what could not be indexed, and why.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(help="at most this many records")] = 100) -> None:
    """Show dead-lettered records with their reason and source position."""

    from ragtide.embedder.dlq import list_dead_letters

    s = current_settings()
    letters = asyncio.run(list_dead_letters(s.kafka, s.dlq_topic, limit))
    table = Table("offset", "source", "reason", "value", title=f"{s.dlq_topic}: {len(letters)} record(s)")
    for d in letters:
        preview = (d.value or b"").decode(errors="replace")[:60]
        table.add_row(str(d.offset), f"{d.topic}[{d.partition}]@{d.source_offset}", d.reason[:70], preview)
    console.print(table)


@dlq_app.command("replay")
def dlq_replay() -> None:
    """Send dead-lettered records (not replayed before) back to their source topic to be retried."""

    from ragtide.embedder.dlq import replay_dead_letters

    s = current_settings()
    letters = asyncio.run(replay_dead_letters(s.kafka, s.dlq_topic))
    console.print(f"replayed {len(letters)} record(s) from {s.dlq_topic}")
