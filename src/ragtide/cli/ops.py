"""Operate the index through the running API (`verify`, `resync`, `reindex`, `optimize`, `search`), and
`export-model`."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.table import Table

from ragtide.cli.common import api_post, app, console, current_settings, rows_progress
from ragtide.contracts.errors import RagtideError
from ragtide.contracts.settings import RagtideSettings


@app.command()
def verify(
    table: Annotated[str | None, typer.Option(help="one source table (schema.table)")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="fix exactly the drift that was found")] = False,
) -> None:
    """Compare the source tables with the index: missing, stale and orphaned rows (exit 1 on drift)."""
    s = current_settings()
    body = api_post(s, "/v1/admin/verify", {"table": table, "repair": repair}, timeout=900, exit_code=2)
    out = Table("table", "rows", "points", "missing", "stale", "orphaned", "repaired", title="index vs source")
    for t in body["tables"]:
        out.add_row(
            t["table"],
            str(t["rows"]),
            str(t["points"]),
            str(t["missing"]),
            str(t["stale"]),
            str(t["orphaned"]),
            str(t["repaired"]),
        )
        for kind, rows in t["examples"].items():
            if rows:
                console.print(f"  {kind} in {t['table']}: {', '.join(rows)}")
    console.print(out)
    if body["drift"] and not repair:
        raise typer.Exit(1)


@app.command()
def resync(
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the snapshot and the embedder")] = 3600.0,
    database: Annotated[
        list[str] | None,
        typer.Option(help="the source database(s) to resync (default: those whose slot was lost, else every one)"),
    ] = None,
) -> None:
    """Recover from a replication slot that Postgres invalidated: drop it, re-snapshot the database's tables into a
    new one through Debezium, wait for the embedder, then verify --repair and verify (exit 1 unless 0 drift)."""
    from ragtide.embedder.liveness import consumed, end_offsets
    from ragtide.ingest.connector import source_topics
    from ragtide.ingest.resync import resync_source
    from ragtide.ingest.slot import read_slot
    from ragtide.ingest.sources import sources_of
    from ragtide.stack.process import wait_until
    from ragtide.stack.stack import Stack

    s = current_settings()
    dbs = Stack(s).databases()
    states = {db.name: read_slot(db.settings.postgres.dsn(), db.settings.connect.slot_name) for db in dbs}
    for db in dbs:
        console.print(f"{db.name}: slot {db.settings.connect.slot_name}: {states[db.name].verdict()[1]}")
    unknown = sorted(set(database or ()) - set(states))
    if unknown:
        raise RagtideError(f"--database {unknown[0]}: not a source database; they are {', '.join(states)}")
    chosen = [db for db in dbs if db.name in database] if database else [db for db in dbs if states[db.name].lost]
    chosen = chosen or dbs
    if not yes:
        names = ", ".join(db.name for db in chosen)
        typer.confirm(f"Drop the slot of {names} and re-snapshot its tables?", abort=True)
    for db in chosen:
        prefix = f"{db.name}: " if len(dbs) > 1 else ""
        resync_source(db.settings, lambda step: console.print(f"… {prefix}{step}"), timeout)  # noqa: B023
    targets = asyncio.run(end_offsets(s.kafka, source_topics(s, sources_of(s))))
    console.print("… waiting for the embedder to consume the snapshot")
    wait_until(lambda: asyncio.run(consumed(s.kafka, s.kafka.group, targets)), "the embedder", timeout)
    repaired = api_post(s, "/v1/admin/verify", {"repair": True}, timeout=900, exit_code=2)
    console.print(f"… verify --repair: {sum(t['repaired'] for t in repaired['tables'])} rows repaired")
    body = api_post(s, "/v1/admin/verify", {"repair": False}, timeout=900, exit_code=2)
    console.print(f"verify: {body['drift']} drift")
    if body["drift"]:
        raise typer.Exit(1)


@app.command()
def reindex(
    table: Annotated[
        str | None, typer.Option(help="re-embed one table's rows in place (default: a new generation of all)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the build until it is live")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the switch")] = 3600.0,
) -> None:
    """Rebuild the index: one table in place, or everything as a new generation beside the live one (blue/green:
    search keeps the live one until the new one has caught up, then switches in one step)."""
    s = current_settings()
    body = api_post(s, "/v1/admin/reindex", {"table": table}, timeout=3600, exit_code=2)
    if table is not None:
        console.print(f"{table}: re-embedded {body['reembedded_rows']} rows ({body['embedded_chunks']} chunks)")
        return
    building = body["building"]
    console.print(f"building generation {building['fingerprint']} (live: {body['live']['fingerprint']})")
    if wait:
        follow_build(s, building["fingerprint"], timeout)


def follow_build(s: RagtideSettings, fingerprint: str, timeout: float) -> None:
    """A progress bar (rows done / total, ETA) until the generation `fingerprint` is live."""
    with rows_progress("reindexing") as progress:
        task = progress.add_task("reindex", total=None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = httpx.get(
                f"{s.api.url}/v1/admin/generations", timeout=10, headers=s.gateway.admin_headers()
            ).json()
            if status["live"]["fingerprint"] == fingerprint:
                progress.update(task, completed=progress.tasks[0].total or 1, total=progress.tasks[0].total or 1)
                console.print(f"generation {fingerprint} is live")
                return
            if status["building"] is None or status["building"]["fingerprint"] != fingerprint:
                raise RagtideError(f"the build of {fingerprint} was abandoned: {status}")
            if status["progress"] and status["progress"]["rows_total"]:
                p = status["progress"]
                progress.update(task, completed=p["rows_done"], total=p["rows_total"])
            time.sleep(0.5)
    raise RagtideError(f"generation {fingerprint} not live within {timeout:.0f}s")


@app.command()
def optimize() -> None:
    """Build the live index's HNSW graph after a large backfill (the embedded engine pauses the node meanwhile)."""
    with console.status("optimizing the live generation's index…"):
        report = api_post(current_settings(), "/v1/admin/optimize", {}, timeout=3600)
    console.print_json(data=report)


@app.command()
def search(
    query: str,
    k: Annotated[int, typer.Option("--k", "-k", help="number of hits")] = 5,
) -> None:
    """Query the running API and print the hits."""
    s = current_settings()
    table = Table("score", "table", "row", "age", "text")
    for h in api_post(s, "/v1/search", {"query": query, "k": k}, timeout=30)["hits"]:
        table.add_row(f"{h['score']:.3f}", h["table"], h["row_id"], f"{h['age_s']:.0f}s", h["text"][:100])
    console.print(table)


@app.command("export-model")
def export_model(
    out: Annotated[Path, typer.Option(help="folder to write")] = Path(".cache/models/all-MiniLM-L6-v2-fp16"),
) -> None:
    """Write the packaged model as an fp16 sentence-transformers folder (~45 MB): what a GPU box without a
    registry needs (`ragtide bench embed --model FOLDER --device cuda`). The folder is the packaged one with
    fp16 weights, so any sentence-transformers version loads it (a folder saved by sentence-transformers 6
    names module paths older versions lack, and drops `max_seq_length`)."""
    from safetensors.torch import load_file, save_file

    from ragtide.embedder.encoder import MODEL_NAME_FILE, default_model_path, model_name_of

    source = default_model_path()
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
    weights = load_file(str(source / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # the box may run the command as another user
    (out / MODEL_NAME_FILE).write_text(json.dumps({"name": model_name_of(source), "dtype": "fp16"}))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"wrote {out} ({size / 2**20:.1f} MiB)")
