"""What every command group shares: the Typer app, the console, the settings of the running processes, and calls to the
running API."""

from __future__ import annotations

import sys
import time
from typing import Any

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

from ragtide.contracts.errors import RagtideError
from ragtide.contracts.settings import RagtideSettings, load_settings

app = typer.Typer(help="ragtide: CDC-driven streaming RAG ingestion.", no_args_is_help=True, add_completion=False)


# Wide enough for the side-by-side benchmark tables when output is piped to a file.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def current_settings() -> RagtideSettings:
    """The settings of the running processes: while `up --cluster` runs, its (the API is its first retriever)."""
    from ragtide.stack.cluster import Cluster

    s = configured_settings()
    cluster = Cluster(s)
    return cluster.settings if any(cluster.status().values()) else s


def configured_settings() -> RagtideSettings:
    """The settings as configured (what `up`, `down` and `status` start from)."""
    return load_settings(RagtideSettings)


def api_post(s: RagtideSettings, path: str, body: dict[str, object], timeout: float, exit_code: int = 1) -> Any:
    """POST to the running API; a non-200 answer is printed and ends the command."""
    resp = httpx.post(f"{s.api.url}{path}", json=body, timeout=timeout, headers=s.gateway.admin_headers())
    if resp.status_code != 200:
        console.print(f"[red]{resp.status_code}[/] {resp.text}")
        raise typer.Exit(exit_code)
    return resp.json()


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


def loopback_api(s: RagtideSettings) -> str:
    """The API's URL, if it is on this machine: load is only ever sent to loopback."""
    from ragtide.bench.serve import require_loopback

    try:
        require_loopback(s.api.url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="api.host") from exc
    return s.api.url
