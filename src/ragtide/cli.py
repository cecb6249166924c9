"""The `ragtide` command line (Typer): run the stack, the services, and the operator's tools."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ragtide.contracts.errors import RagtideError
from ragtide.contracts.logging import setup_logging
from ragtide.contracts.settings import RagtideSettings, authorization, load_settings, redact_dsn

if TYPE_CHECKING:
    from ragtide.stack.supervise import Supervised

app = typer.Typer(help="ragtide: CDC-driven streaming RAG ingestion.", no_args_is_help=True, add_completion=False)
# Wide enough for the side-by-side benchmark tables when output is piped to a file.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _settings() -> RagtideSettings:
    """The settings of the running processes: while `up --cluster` runs, its (the API is its first retriever)."""
    from ragtide.stack.cluster import Cluster

    s = _own_settings()
    cluster = Cluster(s)
    return cluster.settings if any(cluster.status().values()) else s


def _own_settings() -> RagtideSettings:
    """The settings as configured (what `up`, `down` and `status` start from)."""
    return load_settings(RagtideSettings)


def admin_headers(s: RagtideSettings) -> dict[str, str]:
    """The admin key, when one is configured (prod mode)."""
    return s.gateway.admin_headers()


def _post(s: RagtideSettings, path: str, body: dict[str, object], timeout: float, exit_code: int = 1) -> Any:
    """POST to the running API; a non-200 answer is printed and ends the command."""
    resp = httpx.post(f"{s.api.url}{path}", json=body, timeout=timeout, headers=admin_headers(s))
    if resp.status_code != 200:
        console.print(f"[red]{resp.status_code}[/] {resp.text}")
        raise typer.Exit(exit_code)
    return resp.json()


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="load the demo corpus (pydoc topics) when the table is empty")] = True,
    wait: Annotated[bool, typer.Option(help="wait until every source row is indexed")] = True,
    supervise: Annotated[
        bool, typer.Option(help="then stay in the foreground and restart any process that dies, until stopped")
    ] = False,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="the production topology instead of one node: 3 Qdrant nodes, 3 Kafka brokers, Connect, "
            "RAGTIDE_CLUSTER__EMBEDDERS embedders and RAGTIDE_CLUSTER__RETRIEVERS retrievers (see `cluster.*`)",
        ),
    ] = False,
) -> None:
    """Start Postgres (unless RAGTIDE_POSTGRES__DSN names your own: then `ragtide doctor` checks it first), Kafka,
    Connect + Debezium and the ragtide node on localhost (idempotent)."""
    from ragtide.ingest.demo import load_demo
    from ragtide.stack.stack import Stack

    s = _own_settings()
    if cluster:
        from ragtide.stack.cluster import Cluster

        up_cluster(s, demo, wait)
        if supervise:
            supervise_processes(Cluster(s))
        return
    stack = Stack(s)
    with console.status("starting") as status:
        for name in stack.processes():
            status.update(f"starting {name}…")
            t0 = time.monotonic()
            stack.start(name)
            label = {
                "postgres": "postgres" if s.postgres.managed else "source database checked (ragtide doctor)",
                "kafka": "kafka" if s.kafka.managed else f"kafka at {s.kafka.bootstrap}",
                "connect": "connect" if s.connect.managed else f"connector registered at {redact_dsn(s.connect.url)}",
            }.get(name, name)
            console.print(f"[green]✓[/] {label} ({time.monotonic() - t0:.1f}s)")
            if name == "postgres" and demo and s.postgres.managed:
                n = load_demo(s.postgres.dsn())
                console.print(f"[green]✓[/] demo corpus: {n} rows in public.docs")
    if wait:
        wait_indexed(s)
        with console.status("waiting for the canary's first round trip…"):
            stack.wait_ready()
    api = s.api.url
    console.print(
        f"\n[bold]ragtide is up.[/]\n  search API  {api}/v1/search\n  answers     {api}/v1/answer, "
        f"{api}/v1/chat/completions\n  dashboard   {api}/dashboard\n"
        f"  freshness   {api}/v1/freshness\n  OpenAPI     {api}/docs\n"
        f"  metrics     {api}/metrics\n  logs        {s.data_dir / 'logs'}\n\nTry:\n"
    )
    query = json.dumps({"query": "catching exceptions with try and except", "k": 3})
    print(f"curl -s {api}/v1/search -H 'content-type: application/json' -d '{query}'")
    ask = json.dumps({"query": "How do I catch an exception?", "stream": True})
    print(f"curl -sN {api}/v1/answer -H 'content-type: application/json' -d '{ask}'")
    if supervise:
        supervise_processes(stack)


def up_cluster(s: RagtideSettings, demo: bool, wait: bool) -> None:
    """`up --cluster`: start the split topology, then wait until a retriever serves every row."""
    from ragtide.ingest.demo import load_demo
    from ragtide.stack.cluster import Cluster

    c = Cluster(s)
    cs = c.settings
    t0 = time.monotonic()
    with console.status("starting the cluster") as status:
        c.up(lambda what: status.update(f"starting {what}…"))
    console.print(f"[green]✓[/] cluster up ({time.monotonic() - t0:.0f}s)")
    if demo and cs.postgres.managed:
        console.print(f"[green]✓[/] demo corpus: {load_demo(cs.postgres.dsn())} rows in public.docs")
    if wait:
        wait_indexed(cs)
    table = Table("process", "pid", "RSS MiB", "budget MiB")
    memory = c.memory()
    for name, pid in c.status().items():
        rss, budget = memory.get(name, (0, 0))
        table.add_row(name, str(pid or "-"), str(rss or "-"), str(budget or "-"))
    console.print(table)
    urls = c.retriever_urls()
    console.print(
        f"\n[bold]ragtide cluster is up.[/]\n  retrievers  {', '.join(urls)}\n  logs        {c.root / 'logs'}\n"
    )
    query = json.dumps({"query": "catching exceptions with try and except", "k": 3})
    print(f"curl -s {urls[0]}/v1/search -H 'content-type: application/json' -d '{query}'")


def supervise_processes(stack: Supervised) -> None:
    """Restart whatever dies (of the one-node stack or the cluster) until SIGINT or SIGTERM; the processes keep
    running afterwards."""
    import signal
    import threading

    from ragtide.stack.supervise import Restart, Supervisor

    def report(r: Restart) -> None:
        mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
        console.print(f"{mark} restarted {r.name} in {r.took_s:.1f}s {r.error}".rstrip())

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(stack, on_restart=report)
    console.print(f"\nsupervising {', '.join(sup.watched)}; Ctrl-C ends supervision (the processes keep running)")
    sup.run(stop)


def source_row_counts(s: RagtideSettings) -> dict[str, int]:
    """Rows per source table in Postgres (exact: the progress bar waits until the index holds them all)."""
    from ragtide.embedder.progress import counts_by_table
    from ragtide.ingest.sources import dsn_of, sources_of

    sources = sources_of(s)
    return counts_by_table(dsn_of(s, sources), sources, sources.user_tables, exact_up_to=None)


def rows_progress(label: str) -> Progress:
    """A progress bar over rows: done / total, elapsed, remaining."""
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console)


def wait_indexed(s: RagtideSettings, timeout: float = 900.0) -> None:
    """Show a progress bar until the index holds every source row."""
    total = sum(source_row_counts(s).values())
    with rows_progress("indexing") as progress:
        task = progress.add_task("index", total=total)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = httpx.get(f"{s.api.url}/v1/index/stats", timeout=10).json()
            done = sum(t["rows"] for t in stats["tables"].values())
            progress.update(task, completed=min(done, total))
            if done >= total:
                return
            time.sleep(0.5)
    raise RagtideError(f"index did not reach {total} rows within {timeout:.0f}s")


@app.command("register-connector")
def register_connector(
    demo: Annotated[bool, typer.Option(help="create the demo table and load its rows first (when empty)")] = False,
) -> None:
    """Check each source database (ragtide doctor), then create or update its Debezium connector through the
    Connect REST API and wait until it runs."""
    from ragtide.ingest.demo import create_demo_table, load_demo
    from ragtide.stack.stack import Stack

    s = _settings()
    if demo:
        create_demo_table(s.postgres.dsn())
        console.print(f"demo corpus: {load_demo(s.postgres.dsn())} rows in public.docs")
    stack = Stack(s)
    stack.prepare_sources()
    stack.register_connectors()
    for db in stack.databases():
        console.print(f"connector {db.settings.connect.connector_name} is running on {s.connect.url}")


@app.command("apply-sources")
def apply_sources(
    wait: Annotated[bool, typer.Option(help="show a progress bar until the new tables' rows are indexed")] = True,
) -> None:
    """After editing the sources file: update the connector, snapshot new tables' rows, restart the node."""
    from ragtide.stack.stack import Stack

    s = _settings()
    stack = Stack(s)
    added = stack.apply_sources()
    console.print(f"sources applied; incremental snapshot of: {', '.join(added) or 'no new table'}")
    with console.status("waiting until ready…"):
        stack.wait_ready()
    if added and wait:
        wait_indexed(s)


@app.command()
def verify(
    table: Annotated[str | None, typer.Option(help="one source table (schema.table)")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="fix exactly the drift that was found")] = False,
) -> None:
    """Compare the source tables with the index: missing, stale and orphaned rows (exit 1 on drift)."""
    s = _settings()
    body = _post(s, "/v1/admin/verify", {"table": table, "repair": repair}, timeout=900, exit_code=2)
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

    s = _settings()
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
    repaired = _post(s, "/v1/admin/verify", {"repair": True}, timeout=900, exit_code=2)
    console.print(f"… verify --repair: {sum(t['repaired'] for t in repaired['tables'])} rows repaired")
    body = _post(s, "/v1/admin/verify", {"repair": False}, timeout=900, exit_code=2)
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
    s = _settings()
    body = _post(s, "/v1/admin/reindex", {"table": table}, timeout=3600, exit_code=2)
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
            status = httpx.get(f"{s.api.url}/v1/admin/generations", timeout=10, headers=admin_headers(s)).json()
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
def down(
    drop_slot: Annotated[
        bool,
        typer.Option(
            "--drop-slot",
            help="also delete the connector with its offsets and drop the replication slot (a forgotten slot keeps "
            "WAL forever); the next `up` snapshots every table again",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="with --drop-slot and Connect unreachable: drop the slot anyway (then resync after up)"
        ),
    ] = False,
) -> None:
    """Stop every process `ragtide up` started (by pid); data is kept."""
    from ragtide.stack.stack import Stack

    s = _own_settings()
    if drop_slot and not yes:
        typer.confirm(f"Drop replication slot {s.connect.slot_name} and the connector's offsets?", abort=True)
    from ragtide.stack.cluster import Cluster

    cluster = Cluster(s)
    if cluster.status():  # `up --cluster` ran: its members first (the connector is the cluster's)
        cluster.down(lambda name: console.print(f"stopping {name}"))
    for what in Stack(s).down(lambda name: console.print(f"stopping {name}"), drop_slot=drop_slot, force=force):
        console.print(f"[green]✓[/] {what}")


@app.command()
def doctor(
    connect: Annotated[bool, typer.Option(help="also ask Connect whether it can reach the database")] = True,
) -> None:
    """Check the source database (RAGTIDE_POSTGRES__DSN) for CDC: one line per check, each failure with the SQL or
    setting that fixes it; exit 1 on a failure."""
    from ragtide.stack.stack import Stack

    reports = Stack(_settings()).check_sources(connect)
    for name, report in reports:
        if len(reports) > 1:
            print(f"source database {name}:")
        print(report.text())
    if not all(r.ok for _, r in reports):
        raise typer.Exit(1)


@app.command()
def init(
    dsn: Annotated[str, typer.Option(help="the database to index, e.g. postgresql://indexer@db.internal:5432/shop")],
    table: Annotated[list[str] | None, typer.Option(help="a table to index (schema.table); repeat for more")] = None,
    all_tables: Annotated[bool, typer.Option("--all", help="every table that can be indexed")] = False,
    tenant_column: Annotated[str | None, typer.Option(help="a column that scopes searches to one tenant")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write (default: RAGTIDE_SOURCES_FILE)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file without asking")] = False,
) -> None:
    """List the database's tables (key, rows, text and low-cardinality columns) and write a sources file for the
    ones picked (--table, --all, or a prompt on a terminal)."""
    from ragtide.ingest.discover import discover, propose, write_sources

    found = discover(dsn)
    listing = Table("#", "table", "primary key", "rows", "text columns", "metadata columns", title=redact_dsn(dsn))
    offered = [t for t in found if not t.skipped]
    for t in found:
        n = str(offered.index(t) + 1) if t in offered else "-"
        listing.add_row(
            n, t.table, ", ".join(t.key) or "-", f"~{t.rows}", ", ".join(t.text_columns), ", ".join(t.metadata_columns)
        )
    console.print(listing)
    for t in found:
        if t.skipped:
            console.print(f"[yellow]left out[/] {t.table}: {t.skipped}")
    if all_tables:
        picked = [t.table for t in offered]
    elif table:
        picked = table
    elif sys.stdin.isatty() and offered:
        answer = typer.prompt("tables to index (numbers or names, comma-separated)")
        items = [a.strip() for a in answer.split(",") if a.strip()]
        picked = [offered[int(a) - 1].table if a.isdigit() and 0 < int(a) <= len(offered) else a for a in items]
    else:
        console.print("[red]no table picked:[/] name them with --table schema.table (or --all)")
        raise typer.Exit(2)
    config = propose(found, picked, tenant_column)
    target = out or _settings().sources_file
    if target.exists() and not force:
        typer.confirm(f"{target} exists; overwrite it?", abort=True)
    write_sources(config, target)
    console.print(f"[green]✓[/] wrote {target} ({len(config.sources)} tables); edit it freely, then:")
    env = "" if out is None else f"RAGTIDE_SOURCES_FILE={target} "
    shown = redact_dsn(dsn)  # the password is the user's to fill in, never echoed
    print(f"  {env}RAGTIDE_POSTGRES__DSN='{shown}' ragtide doctor")
    print(f"  make up SOURCE_DSN='{shown}'{f' SOURCES={target}' if out is not None else ''}")


@app.command("uninstall-source")
def uninstall_source(yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False) -> None:
    """Remove what ragtide created in your database: connector, replication slot, publication, its schemas."""
    from ragtide.ingest.uninstall import planned
    from ragtide.ingest.uninstall import uninstall_source as remove
    from ragtide.stack.stack import Stack

    databases = Stack(_settings()).databases()
    for db in databases:
        for line in planned(db.settings):
            console.print(f"  - {line}")
    if not yes:
        typer.confirm("Remove all of the above?", abort=True)
    for db in databases:
        removal = remove(db.settings, lambda step: console.print(f"… {step}"))
        for what in removal.done:
            console.print(f"[green]✓[/] {what}")
        if removal.for_owner:
            console.print(f"[yellow]left for the owner of {db.name}[/] (this role may not drop them):")
            for statement in removal.for_owner:
                print(f"  {statement}")


@app.command()
def clean(yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False) -> None:
    """Stop everything and delete the data folder (Postgres, Kafka, index, logs)."""
    from ragtide.stack.stack import Stack

    s = _settings()
    if not yes and not typer.confirm(f"delete {s.data_dir}?"):
        raise typer.Exit(1)
    Stack(s).down()
    shutil.rmtree(s.data_dir, ignore_errors=True)
    console.print(f"removed {s.data_dir}")


@app.command()
def status() -> None:
    """Which processes run, and what the index holds."""
    from ragtide.stack.cluster import Cluster
    from ragtide.stack.stack import Stack

    s = _own_settings()
    table = Table("process", "pid", "state")
    cluster = Cluster(s)
    members = cluster.status()
    if members:  # `up --cluster`: its Postgres and generator, then its members
        s = cluster.settings
        processes = {k: v for k, v in Stack(s).status().items() if k in ("postgres", "generator")} | members
    else:
        processes = Stack(s).status()
    for name, pid in processes.items():
        table.add_row(name, str(pid or "-"), "[green]running[/]" if pid else "[red]stopped[/]")
    console.print(table)
    try:
        console.print_json(httpx.get(f"{s.api.url}/v1/index/stats", timeout=5).text)
    except httpx.HTTPError:
        console.print("index: API not reachable")


@app.command()
def node() -> None:
    """Run the node: embedder + retrieval API in one process (owner of the embedded index)."""
    import uvicorn

    from ragtide.node import create_node_app

    s = _settings()
    setup_logging(s.log_level, s.json_logs)
    uvicorn.run(create_node_app(s), host=s.api.host, port=s.api.port, log_config=None, access_log=False)


@app.command()
def retriever() -> None:
    """Run the retrieval API alone (needs QDRANT_URL)."""
    import uvicorn

    from ragtide.node import create_retriever_app

    s = _settings()
    setup_logging(s.log_level, s.json_logs)
    uvicorn.run(create_retriever_app(s), host=s.api.host, port=s.api.port, log_config=None, access_log=False)


@app.command("serve-embeddings")
def serve_embeddings() -> None:
    """Serve this machine's embedding model as an OpenAI-compatible POST /v1/embeddings (for other deployments'
    `encoder.backend: openai`, e.g. one GPU box shared by several teams), on api.host:api.port."""
    import uvicorn

    from ragtide.node import create_embeddings_app

    s = _settings()
    setup_logging(s.log_level, s.json_logs)
    uvicorn.run(create_embeddings_app(s), host=s.api.host, port=s.api.port, log_config=None, access_log=False)


@app.command()
def embedder() -> None:
    """Run one Faust embedder (with QDRANT_URL: one of N in the group; the one holding the lease leads builds);
    /healthz, /metrics and the leader's /v1/admin on the API port."""
    import faust

    from ragtide.embedder.liveness import serve_health
    from ragtide.ingest.connector import ensure_topics, source_topics
    from ragtide.ingest.sources import sources_of
    from ragtide.node import create_embedder

    s = _settings()
    setup_logging(s.log_level, s.json_logs)
    worker, api = create_embedder(s)
    asyncio.run(ensure_topics(s, source_topics(s, sources_of(s))))  # before the consumer subscribes
    serve_health(api, s.api.host, s.api.port)
    faust.Worker(worker, loglevel=s.log_level).execute_from_commandline()


@app.command()
def optimize() -> None:
    """Build the live index's HNSW graph after a large backfill (the embedded engine pauses the node meanwhile)."""
    with console.status("optimizing the live generation's index…"):
        report = _post(_settings(), "/v1/admin/optimize", {}, timeout=3600)
    console.print_json(data=report)


@app.command()
def search(
    query: str,
    k: Annotated[int, typer.Option("--k", "-k", help="number of hits")] = 5,
) -> None:
    """Query the running API and print the hits."""
    s = _settings()
    table = Table("score", "table", "row", "age", "text")
    for h in _post(s, "/v1/search", {"query": query, "k": k}, timeout=30)["hits"]:
        table.add_row(f"{h['score']:.3f}", h["table"], h["row_id"], f"{h['age_s']:.0f}s", h["text"][:100])
    console.print(table)


dlq_app = typer.Typer(help="The dead-letter topic: what could not be indexed, and why.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(help="at most this many records")] = 100) -> None:
    """Show dead-lettered records with their reason and source position."""
    import asyncio

    from ragtide.embedder.dlq import list_dead_letters

    s = _settings()
    letters = asyncio.run(list_dead_letters(s.kafka, s.dlq_topic, limit))
    table = Table("offset", "source", "reason", "value", title=f"{s.dlq_topic}: {len(letters)} record(s)")
    for d in letters:
        preview = (d.value or b"").decode(errors="replace")[:60]
        table.add_row(str(d.offset), f"{d.topic}[{d.partition}]@{d.source_offset}", d.reason[:70], preview)
    console.print(table)


@dlq_app.command("replay")
def dlq_replay() -> None:
    """Send dead-lettered records (not replayed before) back to their source topic to be retried."""
    import asyncio

    from ragtide.embedder.dlq import replay_dead_letters

    s = _settings()
    letters = asyncio.run(replay_dead_letters(s.kafka, s.dlq_topic))
    console.print(f"replayed {len(letters)} record(s) from {s.dlq_topic}")


keys_app = typer.Typer(help="API keys and quotas of tenants (stored hashed in Postgres).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _gateway_store() -> Any:
    from ragtide.gateway.store import PostgresGatewayStore

    store = PostgresGatewayStore(_settings().postgres.state())
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

    store, s = _gateway_store(), _settings()
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


bench_app = typer.Typer(help="Benchmarks against the running stack (start it with `make up`).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("embed")
def bench_embed(
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    n: Annotated[int, typer.Option("--n", help="chunks in the corpus (100000 on a GPU)")] = 1000,
    repeats: Annotated[int, typer.Option(help="timed runs per contender (best counts)")] = 2,
    dtype: Annotated[
        str,
        typer.Option(
            help="engine precision: auto (fp16 on CUDA; bf16 or fp32 by CPU features), fp32, fp16, bf16, int8 (CPU)"
        ),
    ] = "auto",
    model: Annotated[Path | None, typer.Option(help="model folder (default: the packaged all-MiniLM-L6-v2)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
    variants: Annotated[
        bool,
        typer.Option(
            help="also time the engine's other settings (fp32 and int8 on CPU; bf16, Rust tokenizer, ids on CUDA)"
        ),
    ] = True,
    compile: Annotated[bool, typer.Option("--compile", help="also time the engine under torch.compile")] = False,
) -> None:
    """Naive sentence-transformers vs the embedding engine, side by side: chunks/s, tokens/s, small-batch
    latency, peak GPU memory and cosine deviation from the fp32 reference (needs no running stack)."""
    from ragtide.bench import embed
    from ragtide.embedder.encoder import resolve_device

    if dtype not in ("auto", "fp32", "fp16", "bf16", "int8"):
        raise typer.BadParameter("one of auto, fp32, fp16, bf16, int8", param_hint="--dtype")
    if n < 64:
        raise typer.BadParameter("at least 64 chunks", param_hint="--n")
    result = embed.run(
        model or embed.default_model_dir(),
        resolve_device(device),
        n,
        repeats,
        dtype=dtype,
        variants=variants,
        compile=compile,
        log=console.print,
    )
    print(embed.render(result))
    console.print(f"result: {embed.save(result, out)}")


@bench_app.command("write")
def bench_write(
    n: Annotated[int, typer.Option("--n", help="rows in the backfill")] = 20_000,
    batch: Annotated[int, typer.Option(help="events per batch (256: the CPU default; 4096: CUDA's)")] = 256,
    repeats: Annotated[int, typer.Option(help="runs per contender, alternating (best counts)")] = 2,
    baseline: Annotated[
        str | None, typer.Option(help="also run the write path of this git revision, side by side")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
) -> None:
    """The write path with embeddings made free (random unit vectors): chunking, diffing, payloads, upserts into
    the embedded engine, in one process; `verify` after each run (needs no running stack)."""
    from ragtide.bench import write

    if n < 100:
        raise typer.BadParameter("at least 100 rows", param_hint="--n")
    repo = Path(write.__file__).resolve().parents[3]
    result = write.run(n, batch, repeats, baseline, repo, log=console.print)
    print(write.render(result))
    console.print(f"result: {write.save(result, out)}")
    if any(r["verify_drift"] for r in result["contenders"].values()):
        console.print("[red]verify found drift[/]")
        raise typer.Exit(1)


@bench_app.command("scale")
def bench_scale(
    rows: Annotated[
        int, typer.Option(help="rows the write path backfills (random unit vectors instead of the model)")
    ] = 50_000,
    model_rows: Annotated[
        int, typer.Option(help="rows the real model backfills (it embeds ~20 rows/s on 2 cores)")
    ] = 2_000,
    embedders: Annotated[list[int] | None, typer.Option("--embedders", help="embedder processes per run")] = None,
    rate: Annotated[
        float, typer.Option(help="changes/s written (and probed for freshness) during each backfill")
    ] = 50.0,
    out: Annotated[Path, typer.Option(help="folder for the JSON and PNG")] = Path("bench/results"),
) -> None:
    """Backfill throughput of 1, 2 and 4 embedder processes against a 3-node Qdrant cluster (its own `up
    --cluster`, stopped at the end), with the real model and with random unit vectors (the write path alone), and
    freshness at `rate` changes/s during each backfill; side by side."""
    import signal

    from ragtide.bench import scale

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops its cluster
    report, path, png = scale.run(rows, model_rows, embedders or [1, 2, 4], rate, out, log=console.print)
    print(report.table())
    console.print(f"machine: {report.machine}\nresult: {path}" + (f", {png}" if png else ""))


@bench_app.command("query-wait")
def bench_query_wait(
    n: Annotated[int, typer.Option("--n", help="queries timed per contender")] = 40,
    batch: Annotated[int, typer.Option(help="texts per backfill batch (the embedder's default on a CPU)")] = 256,
) -> None:
    """A query's embedding latency during a backfill: sharing the writer's engine (one lock: it waits for whole
    batches) against an engine of its own, side by side (needs no running stack)."""
    from ragtide.bench import embed
    from ragtide.contracts.machine import cpu_info
    from ragtide.embedder.engine import EmbeddingEngine

    model = embed.default_model_dir()
    texts = embed.corpus(EmbeddingEngine(model, "cpu").tokenizer, 4 * batch)
    queries = [f"how do I {w} a file" for w in ("open", "read", "close", "lock", "copy", "move", "delete", "rename")]
    result = embed.query_wait(lambda: EmbeddingEngine(model, "cpu"), texts, (queries * n)[:n], batch)
    table = Table("query embedding during a backfill", "p50 ms", "p95 ms", "max ms")
    for name, r in result.items():
        table.add_row(name, str(r["p50_ms"]), str(r["p95_ms"]), str(r["max_ms"]))
    console.print(table)
    console.print(f"machine: {cpu_info()}")


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


FIND_MAX_STEPS = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 70.0, 100.0, 150.0, 200.0, 300.0, 400.0)
FRESHNESS_TARGETS = {5.0: (0.3, 0.8), 50.0: (0.5, 1.5)}  # rate -> (p50, p99) seconds on this 2-core machine


def _loopback_api(s: RagtideSettings) -> str:
    """The API's URL, if it is on this machine: load is only ever sent to loopback."""
    from ragtide.bench.serve import require_loopback

    try:
        require_loopback(s.api.url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="api.host") from exc
    return s.api.url


@bench_app.command("serve")
def bench_serve(
    duration: Annotated[float, typer.Option(min=1, max=300, help="seconds per search phase")] = 10.0,
    clients: Annotated[int, typer.Option(min=2, max=64, help="concurrent clients of the second search phase")] = 8,
    answers: Annotated[int, typer.Option(min=0, max=200, help="streamed answers (0: skip)")] = 5,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024, help="completion length of each answer")] = 32,
    key: Annotated[str | None, typer.Option(help="API key (default: none, which dev mode allows)")] = None,
    grow_to: Annotated[
        int | None,
        typer.Option(min=1, max=2_000_000, help="first insert synthetic rows until the index holds this many chunks"),
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
    backfill_to: Annotated[
        int | None,
        typer.Option(min=1, max=2_000_000, help="search with 1 client while a backfill grows the index to this many"),
    ] = None,
    connections: Annotated[
        list[int] | None, typer.Option("--connections", help="wrk load levels (default 64, 256, 1024)")
    ] = None,
    sweep: Annotated[
        list[int] | None, typer.Option("--sweep", help="smaller levels, for the best QPS at p99 ≤ 200 ms")
    ] = None,
    level_s: Annotated[float, typer.Option(min=1, max=120, help="seconds per wrk level")] = 15.0,
    baseline: Annotated[
        str | None, typer.Option(help="also run the node of this git revision over the same data, side by side")
    ] = None,
    load: Annotated[bool, typer.Option(help="run the wrk levels (needs wrk)")] = True,
) -> None:
    """Search latency with 1 client and the QPS N clients hold, then TTFT of streamed answers; then wrk at 64, 256
    and 1,024 connections (and a sweep), for this code and, with --baseline, another revision's, side by side."""
    from ragtide.bench import load as wrk
    from ragtide.bench.serve import (
        ServeResult,
        answer_phase,
        grow_index,
        indexed_chunks,
        search_during_backfill,
        search_phase,
    )
    from ragtide.contracts.machine import cpu_info

    s = _settings()
    api = _loopback_api(s)
    headers = authorization(key)
    if grow_to:
        with console.status(f"growing the index to {grow_to} chunks through the pipeline…") as status:
            grow_index(s.postgres.dsn(), api, grow_to, timeout=3600, progress=lambda n: status.update(f"{n} chunks"))
    phases = []
    if backfill_to:
        with console.status(f"searching while a backfill grows the index to {backfill_to} chunks…"):
            phases.append(search_during_backfill(s.postgres.dsn(), api, headers, backfill_to, timeout=3600))
    if backfill_to or grow_to:
        with console.status("building the index's HNSW graph (ragtide optimize)…"):
            _post(s, "/v1/admin/optimize", {}, timeout=3600)
    for n in (1, clients):
        with console.status(f"/v1/search with {n} client(s) for {duration:g}s…"):
            phases.append(search_phase(api, headers, n, duration, max_requests=200_000))
    if answers:
        with console.status(f"{answers} streamed answers…"):
            phases.append(answer_phase(api, headers, answers, max_tokens, timeout=300))
    result = ServeResult(api, indexed_chunks(api, headers), phases, time.strftime("%Y%m%d-%H%M%S"))
    result.machine = cpu_info()
    if load:
        levels, swept = connections or [64, 256, 1024], sweep or [1, 4, 16, 32, 64]
        with console.status(f"wrk: {levels} and {swept} connections, {level_s:g}s each…"):
            result.load["this"] = wrk.measure(api, levels, swept, level_s, key)
        if baseline:
            with (
                console.status(f"the node of {baseline}, then wrk against it…"),
                wrk.baseline_node(s, baseline, wrk.git_toplevel()) as short,
            ):
                result.load[f"baseline {short}"] = wrk.measure(api, levels, swept, level_s, key)
        with console.status("limits still apply: a key of 10 requests/s under 16 connections…"):
            result.limits = wrk.limits_apply(s, api)
    table = Table(
        "phase",
        "requests",
        "errors",
        "QPS",
        "p50",
        "p95",
        "p99",
        "server p50",
        "TTFT p50",
        "TTFT p95",
        "tokens/s",
        title=f"bench serve: {api}, {result.indexed_chunks} indexed chunks",
    )
    for p in phases:
        lat, ttft = p.latency_ms, p.extra.get("ttft_ms", {})
        tps = p.extra.get("tokens_per_s", {}).get("p50")
        table.add_row(
            p.name,
            str(p.requests),
            str(p.errors),
            f"{p.qps:g}",
            *(f"{lat.get(q)} ms" for q in ("p50", "p95", "p99")),
            f"{p.server_ms.get('p50', '–')} ms" if p.server_ms else "–",
            f"{ttft.get('p50')} ms" if ttft else "–",
            f"{ttft.get('p95')} ms" if ttft else "–",
            f"{tps:.0f}" if tps else "–",
        )
    Console(width=200).print(table)
    for name, measured in result.load.items():
        lv = Table(
            "connections", "QPS (200s)", "p50", "p95", "p99", "shed 503", "timeouts", "socket errors", title=name
        )
        for row in measured["levels"] + measured["sweep"]:
            lv.add_row(
                str(row["connections"]),
                f"{row['qps']:g}",
                *(f"{row[q]} ms" for q in ("p50_ms", "p95_ms", "p99_ms")),
                str(row["shed"]),
                str(row["timeouts"]),
                str(row["socket_errors"]),
            )
        Console(width=200).print(lv)
        print(f"{name}: best QPS with p99 ≤ 200 ms and nothing shed: {measured['best_qps_p99_200ms']:g}")
    if result.limits:
        lim = result.limits
        print(f"limits: a {lim['rate_per_s']:g}/s key under 16 connections: {lim['ok']} ok, {lim['limited']} 429s")
    console.print(f"result: {result.save(out)}")


@bench_app.command("cache")
def bench_cache(
    k: Annotated[int, typer.Option(min=1, max=20, help="chunks per answer")] = 3,
    max_tokens: Annotated[int, typer.Option(min=1, max=256, help="completion length of each answer")] = 16,
    stale_rows: Annotated[int, typer.Option(min=0, max=50, help="rows changed after their answer was cached")] = 5,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
) -> None:
    """Replay paraphrased questions: hit rate, wrong-hit rate, latency hit vs miss, and stale hits after a
    cited row changed, in one run (against the running stack)."""
    from ragtide.bench.cache import replay

    s = _settings()
    api = _loopback_api(s)
    with console.status("replaying questions…"):
        bench = replay(api, s.postgres.dsn(), k, max_tokens, stale_rows, admin_headers(s), log=console.print)
    bench.threshold = s.cache.threshold
    summary = bench.summary()
    table = Table(
        "", "hit", "miss", title=f"bench cache: {summary['questions']} questions, threshold {s.cache.threshold}"
    )
    table.add_row("p50", f"{summary['hit_ms']['p50']} ms", f"{summary['miss_ms']['p50']} ms")
    table.add_row("p99", f"{summary['hit_ms']['p99']} ms", f"{summary['miss_ms']['p99']} ms")
    table.add_row("count", str(summary["hit_ms"]["count"]), str(summary["miss_ms"]["count"]))
    for q in ("p50", "p99"):
        table.add_row(f"server {q}", f"{summary['hit_server_ms'][q]} ms", f"{summary['miss_server_ms'][q]} ms")
    Console(width=160).print(table)
    kinds = ", ".join(f"{kind} {v['hits']}/{v['asked']}" for kind, v in summary["by_kind"].items())
    print(f"hit rate {summary['hit_rate']} ({kinds})")
    print(f"wrong hits {summary['wrong_hits']} (rate {summary['wrong_hit_rate']})")
    print(f"stale hits after a cited row changed: {summary['stale_hits']} of {summary['stale_checks']} checks")
    console.print(f"result: {bench.save(out)}")


@bench_app.command("freshness")
def bench_freshness(
    rate: Annotated[list[float], typer.Option(help="changes per second; repeat for a side-by-side run")] = [5.0, 50.0],  # noqa: B006
    duration: Annotated[float, typer.Option(help="seconds of load per rate")] = 30.0,
    mix: Annotated[str, typer.Option(help="update:insert:meta:delete weights")] = "50:20:15:15",
    find_max: Annotated[bool, typer.Option(help="also step up the rate until lag grows")] = False,
    out: Annotated[Path, typer.Option(help="folder for the JSON result and the PNG plot")] = Path("bench/results"),
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="run the rates once per encoder precision (fp32, fp16, bf16, int8; repeat for a side-by-side run): "
            "the node is restarted with it, its index rebuilt in that precision first, and restarted as configured "
            "after (rebuilding back in the background); one-node stack only, not under `up --supervise`"
        ),
    ] = None,
) -> None:
    """Commit -> searchable under a steady write load from a separate process: p50/p95/p99/max, per stage."""
    from contextlib import nullcontext

    from ragtide.bench import save_result
    from ragtide.bench.freshness import RateResult, node_with_dtype, plot, run_rate
    from ragtide.bench.workload import parse_mix
    from ragtide.contracts.machine import cpu_info

    s = _settings()
    machine = cpu_info()
    console.print(f"machine: {machine['model']}, {machine['cpus']} CPUs, features {' '.join(machine['features'])}")
    try:
        weights = parse_mix(mix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from exc
    if any(per_s <= 0 or per_s > 1000 for per_s in rate):
        raise typer.BadParameter("rates must be in (0, 1000]", param_hint="--rate")
    if any(d not in ("fp32", "fp16", "bf16", "int8") for d in dtype or []):
        raise typer.BadParameter("one of fp32, fp16, bf16, int8", param_hint="--dtype")
    if dtype and find_max:
        raise typer.BadParameter("--find-max runs with the node as configured, without --dtype", param_hint="--dtype")
    if dtype and s.encoder.backend != "engine":
        raise typer.BadParameter(f"needs encoder.backend: engine (not {s.encoder.backend})", param_hint="--dtype")
    if dtype and s.data_dir != _own_settings().data_dir:  # `_settings()` gave the cluster's
        raise typer.BadParameter("restarts the one-node stack's node; not with `up --cluster`", param_hint="--dtype")
    results: list[RateResult] = []
    for node in dtype or [""]:
        if node:
            console.print(f"restarting the node with encoder.dtype={node} (its index rebuilt in it if need be)…")
        with node_with_dtype(s, node) if node else nullcontext(s) as ns:
            for per_s in rate:
                with console.status(f"{node + ': ' if node else ''}{per_s:g} changes/s for {duration:g}s…"):
                    res = run_rate(ns, per_s, duration, weights)
                res.node = node
                results.append(res)
    max_sustained: float | None = None
    if find_max:
        # Step up from the best sustained rate, staying below the lowest rate that already failed.
        ok = max((r.rate for r in results if r.sustained), default=0.0)
        failed = min((r.rate for r in results if not r.sustained), default=float("inf"))
        for step in [c for c in FIND_MAX_STEPS if ok < c < failed]:
            with console.status(f"looking for the sustained maximum: {step:g} changes/s…"):
                res = run_rate(s, step, min(duration, 20.0), weights)
            results.append(res)
            if not res.sustained:
                break
        max_sustained = max((r.rate for r in results if r.sustained), default=None)
        results.sort(key=lambda r: r.rate)
    table = Table(
        *(["encoder.dtype"] if dtype else []),
        "rate (/s)",
        "achieved",
        "changes",
        "p50",
        "p95",
        "p99",
        "max",
        "canary p50",
        "target p50/p99",
        "sustained",
        title="commit -> searchable (seconds)",
    )
    for r in results:
        e = r.end_to_end
        tgt = FRESHNESS_TARGETS.get(r.rate)
        ok = tgt is not None and (e["p50"] or 99) <= tgt[0] and (e["p99"] or 99) <= tgt[1]
        target = f"{tgt[0]}/{tgt[1]} {'[green]met[/]' if ok else '[red]missed[/]'}" if tgt else "-"
        table.add_row(
            *([r.node] if dtype else []),
            f"{r.rate:g}",
            f"{r.achieved_per_s:g}",
            str(e["count"]),
            _s(e["p50"]),
            _s(e["p95"]),
            _s(e["p99"]),
            _s(e["max"]),
            _s(r.canary["p50"]),
            target,
            "yes" if r.sustained else "[red]no[/]",
        )
    console.print(table)
    stages = Table(
        "stage", *(f"{r.node} {r.rate:g}/s p50 · p95".lstrip() for r in results), title="where the time goes"
    )
    for stage in results[0].stages:
        stages.add_row(stage, *(f"{_s(r.stages[stage]['p50'])} · {_s(r.stages[stage]['p95'])}" for r in results))
    console.print(stages)
    if max_sustained is not None:
        console.print(f"largest sustained rate tried: {max_sustained:g} changes/s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = {
        "machine": machine,
        "mix": weights,
        "duration_s": duration,
        "max_sustained": max_sustained,
        "results": [r.as_dict() for r in results],
    }
    result_file = save_result(summary, out, "freshness", stamp)
    png = plot(results, out / f"freshness-{stamp}.png")
    console.print(f"wrote {result_file}" + (f" and {png}" if png else " (install matplotlib for the plot)"))


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    """Entry point: errors we raise on purpose print as one clear message, not a traceback."""
    try:
        app()
    except RagtideError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
