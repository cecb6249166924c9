"""The standalone retriever's side: `CatalogFollower` re-reads the catalog in the background and serves the live
generation's collection and encoder, switching after the embedder does."""

from __future__ import annotations

import logging
import threading

from ragtide.contracts.logging import BackgroundFailures
from ragtide.embedder.encoder import Encoder
from ragtide.embedder.generations.catalog import Catalog
from ragtide.embedder.generations.spec import GenerationFactory, GenerationSpec
from ragtide.embedder.index.base import VectorIndex

log = logging.getLogger(__name__)


class CatalogFollower:
    """The standalone retriever's view of the live generation. A background thread re-reads the catalog every
    `every_s` seconds; after a switch it opens the new collection and its encoder, and only then serves them
    (search never waits on it; the embedder keeps the old collection for a grace period)."""

    def __init__(
        self,
        catalog: Catalog,
        factory: GenerationFactory,
        desired: GenerationSpec,
        every_s: float = 2.0,
        failures: BackgroundFailures | None = None,
    ):
        self.failures = failures or BackgroundFailures()
        self.catalog = catalog
        self.factory = factory
        self.every_s = every_s
        live = catalog.read().live or desired  # an empty store: the embedder will create this one
        self._gen = factory(live)
        self._gen.index.ensure_collection(live.dim)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Follow the catalog once; True when it switched."""
        live = self.catalog.read().live
        if live is None or live.fingerprint == self._gen.spec.fingerprint:
            return False
        gen = self.factory(live)
        gen.index.ensure_collection(live.dim)
        self._gen = gen  # the old pair stays usable by requests holding it; the embedder drops it later
        log.info("following the switch to a new generation", extra={"live": live.as_dict()})
        return True

    def _loop(self) -> None:
        failures = self.failures.loop("reading the catalog (serving the current generation)", log)
        while not self._stop.wait(self.every_s):
            try:
                self.refresh()
                failures.recovered()
            except Exception as exc:
                failures.failed(exc)

    def current(self) -> tuple[VectorIndex, Encoder]:
        """The live pair (never blocks); starts the follower thread on first use."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="catalog-follower", daemon=True)
            self._thread.start()
        gen = self._gen
        return gen.index, gen.encoder

    def close(self) -> None:
        """Stop following; close the collection and the catalog."""
        self._stop.set()
        self._gen.index.close()
        self.catalog.index.close()
