"""The switch policy: `BuildWatcher` verifies the generation being built against the source, repairs a stalled
build, promotes it live once nothing drifts and reaps retired collections; `verify_generation` is its check."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ragtide.contracts.logging import BackgroundFailures
from ragtide.embedder.generations.dual import Generations, LockedWriter
from ragtide.embedder.generations.spec import Generation
from ragtide.embedder.verify import TableDrift, verify_table
from ragtide.ingest.sources import SourcesConfig

log = logging.getLogger(__name__)

VerifyTable = Callable[[Generation, str, bool], TableDrift]


class BuildWatcher:
    """Verifies the generation being built and switches it live when it equals the source.

    Checks get rarer as they get longer (at least `interval_s`, at most a quarter of the time spent verifying).
    When the drift stops shrinking while nothing else moves (a lost snapshot signal), the drift is repaired.
    """

    def __init__(
        self,
        generations: Generations,
        sources: SourcesConfig,
        verify: VerifyTable,
        interval_s: float = 2.0,
        stall_checks: int = 5,
        failures: BackgroundFailures | None = None,
    ) -> None:
        self.failures = failures or BackgroundFailures()
        self.generations = generations
        self.sources = sources
        self.verify = verify
        self.interval_s = interval_s
        self.stall_checks = stall_checks
        self._unchanged = 0
        self._batches_seen = -1

    def check(self) -> bool:
        """One verify pass over the build; True when it switched live."""
        gens = self.generations
        gen = gens.building
        if gen is None:
            return False
        before = gens.progress.drift if gens.progress else -1
        batches = gens.build_batches
        reports = [self.verify(gen, table, False) for table in self.sources.user_tables]
        progress = gens.record_progress(reports)
        drift = sum(r.drift for r in reports)
        if drift == 0:
            gens.promote(expected=gen.spec.fingerprint)  # what was verified, even if a new tenure moved on
            return True
        # Stalled: the drift stays the same while the stream brings the build nothing (a lost snapshot signal).
        # A big snapshot batch still being embedded is not a stall.
        idle = batches == self._batches_seen and not gens.applying_build
        self._batches_seen = gens.build_batches
        self._unchanged = self._unchanged + 1 if drift == before and idle else 0
        if self._unchanged >= self.stall_checks:
            log.warning("build stalled; repairing its drift from the source", extra={"drift": drift})
            refused: dict[str, str] = {}
            for table in self.sources.user_tables:
                report = self.verify(gen, table, True)
                refused |= {f"{table}:{row}": why for row, why in report.unrepairable.items()}
                if report.unrepaired:  # e.g. rows its provider refuses: the build cannot go live while they drift
                    log.error(
                        "rows the build cannot hold; it will not switch live until they change",
                        extra={"table": table, "rows": report.unrepaired, "examples": report.unrepairable},
                    )
            if progress is not None:
                progress.unrepairable = refused
            self._unchanged = 0
        log.info("building", extra=progress.as_dict() if progress else {})
        return False

    async def run(self) -> None:
        """Check until cancelled."""
        reap_failures = self.failures.loop("dropping a retired generation", log)
        check_failures = self.failures.loop("build check", log)
        delay = self.interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self.generations.reap)
                reap_failures.recovered()
            except Exception as exc:
                reap_failures.failed(exc)
            if self.generations.building is None:
                delay = self.interval_s
                continue
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.check)
                check_failures.recovered()
            except Exception as exc:
                check_failures.failed(exc)
            delay = max(self.interval_s, 4 * (time.monotonic() - t0))


def verify_generation(
    dsn_of: Callable[[str], str],
    generations: Generations,
    sources: SourcesConfig,
    gen: Generation,
    table: str,
    repair: bool,
    reembed: bool = False,
) -> tuple[TableDrift, int]:
    """verify_table against one generation, reading the source at a REPEATABLE READ snapshot; its writes are
    serialised with the stream's. Returns the report and how many chunks its writes embedded."""
    from ragtide.ingest.rows import read_rows

    source = sources.get(table)
    assert source is not None
    writer = LockedWriter(generations, gen)
    with gen.writer.remembering_deletes():  # from before the snapshot until its writes are done
        position, rows = read_rows(dsn_of(table), source)
        return verify_table(source, position, rows, gen.index, writer, repair, reembed), writer.embedded


def verifier(dsn_of: Callable[[str], str], generations: Generations, sources: SourcesConfig) -> VerifyTable:
    """The BuildWatcher's verify: verify_generation without the embedding count."""
    return lambda gen, table, repair: verify_generation(dsn_of, generations, sources, gen, table, repair)[0]
