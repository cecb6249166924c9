"""Run the stack: `up` (one node or `--cluster`), `down`, `status`, `clean`, and the source database's `init`, `doctor`,
`register-connector`, `apply-sources` and `uninstall-source`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from rich.table import Table

from ragtide.cli.common import app, configured_settings, console, current_settings, wait_indexed
from ragtide.contracts.settings import RagtideSettings, redact_dsn

if TYPE_CHECKING:
    from ragtide.stack.supervise import Supervised


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

    s = configured_settings()
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

    from ragtide.contracts.machine import keep_stderr_at_exit
    from ragtide.stack.supervise import Restart, Supervisor

    keep_stderr_at_exit()  # a long-running process: its stderr is its log

    def report(r: Restart) -> None:
        mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
        console.print(f"{mark} restarted {r.name} in {r.took_s:.1f}s {r.error}".rstrip())

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(stack, on_restart=report)
    console.print(f"\nsupervising {', '.join(sup.watched)}; Ctrl-C ends supervision (the processes keep running)")
    sup.run(stop)


@app.command("register-connector")
def register_connector(
    demo: Annotated[bool, typer.Option(help="create the demo table and load its rows first (when empty)")] = False,
) -> None:
    """Check each source database (ragtide doctor), then create or update its Debezium connector through the
    Connect REST API and wait until it runs."""
    from ragtide.ingest.demo import create_demo_table, load_demo
    from ragtide.stack.stack import Stack

    s = current_settings()
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

    s = current_settings()
    stack = Stack(s)
    added = stack.apply_sources()
    console.print(f"sources applied; incremental snapshot of: {', '.join(added) or 'no new table'}")
    with console.status("waiting until ready…"):
        stack.wait_ready()
    if added and wait:
        wait_indexed(s)


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

    s = configured_settings()
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

    reports = Stack(current_settings()).check_sources(connect)
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
    target = out or current_settings().sources_file
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

    databases = Stack(current_settings()).databases()
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

    s = current_settings()
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

    s = configured_settings()
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
