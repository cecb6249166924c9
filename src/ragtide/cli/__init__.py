"""The `ragtide` command line (Typer), one module per command group: `stack` (run the stack, the source database),
`processes` (the long-running processes), `ops` (verify, reindex, search...), `dlq`, `keys` and `bench`. Their
bodies parse options, call library code and print; `common` holds what they share."""

from __future__ import annotations

import importlib
import sys

from ragtide.cli.common import app, console
from ragtide.contracts.errors import RagtideError
from ragtide.contracts.machine import quiet_native_teardown

__all__ = ["app", "main"]

# Each group registers its commands on `app` when imported; this order is `ragtide --help`'s.
for _group in ("stack", "processes", "ops", "dlq", "keys", "bench"):
    importlib.import_module(f"ragtide.cli.{_group}")


def main() -> None:
    """Entry point: errors we raise on purpose print as one clear message, not a traceback."""
    quiet_native_teardown()
    try:
        app()
    except RagtideError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
