"""Serving a changed index bundle without a restart: notice the change, load the new bundle aside, swap it in.

`tfr index --add/--delete` (and `build_bundle`) write a whole new bundle folder and swap it in for the old one with a
rename, so the folder at a bundle's path is always complete. A new folder (inode) or a new `catalog.json` marks a new
bundle; the page then loads it in a background thread while the old engine keeps answering, and hands over the new
engine, which later requests use (a request keeps the engines it started with).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from tf_retrieval.search.engine import RetrievalEngine

logger = logging.getLogger(__name__)


def bundle_signature(bundle_dir: str) -> tuple[int, ...] | None:
    """What changes when a bundle is replaced: the folder's and its catalog's identity and mtime; None while absent."""
    try:
        folder = os.stat(bundle_dir)
        catalog = os.stat(os.path.join(bundle_dir, "catalog.json"))
    except FileNotFoundError:  # between the two renames of a non-atomic swap, or deleted
        return None
    return folder.st_dev, folder.st_ino, catalog.st_ino, catalog.st_mtime_ns, catalog.st_size


class BundleReloader:
    """Reloads engines whose index bundle changed on disk and hands them to `on_reload`.

    `check()` (cheap: called on every request) looks at the bundles at most every `interval` seconds; when some changed,
    one background thread loads them (`RetrievalEngine.load`, keeping the old engine's embedder). A bundle that changes
    again while it is read is read again at the next check, so a mix of two versions is never served; one that cannot
    be loaded (or now holds another model) is logged and skipped until it changes again. Engines without a bundle folder
    (built in memory) are never reloaded.

    Args:
      engines: model name -> engine being served.
      on_reload: called from the loading thread with {model name: new engine}.
      interval: seconds between two looks at the bundles; <= 0 turns reloading off.
    """

    def __init__(self, engines: Mapping[str, RetrievalEngine],
                 on_reload: Callable[[dict[str, RetrievalEngine]], None], interval: float = 2.0):
        self.interval = interval
        self._on_reload = on_reload
        self._engines = {name: engine for name, engine in engines.items()
                         if getattr(engine, "bundle_dir", None) and interval > 0}
        self._seen = {name: bundle_signature(engine.bundle_dir) for name, engine in self._engines.items()}
        self._next_check = time.monotonic() + interval
        self._lock = threading.Lock()
        self._loading: threading.Thread | None = None

    def check(self) -> None:
        """Starts loading the bundles that changed, if it is time to look and no load is running."""
        if not self._engines or time.monotonic() < self._next_check:
            return
        with self._lock:
            if time.monotonic() < self._next_check or self._loading is not None:
                return
            self._next_check = time.monotonic() + self.interval
            changed = {name: signature for name, signature in
                       ((name, bundle_signature(engine.bundle_dir)) for name, engine in self._engines.items())
                       if signature is not None and signature != self._seen[name]}
            if changed:
                self._loading = threading.Thread(target=self._reload, args=(changed,), name="bundle-reloader",
                                                 daemon=True)
                self._loading.start()

    def wait(self, timeout: float | None = None) -> None:
        """Waits for a running reload to finish (for tests and shutdown)."""
        loading = self._loading
        if loading is not None:
            loading.join(timeout)

    def _reload(self, changed: dict[str, tuple[int, ...]]) -> None:
        try:
            loaded = {}
            for name, signature in changed.items():
                engine = self._load(name, self._engines[name], signature)
                if engine is not None:
                    loaded[name] = engine
            if loaded:
                self._engines = {**self._engines, **loaded}
                self._on_reload(loaded)
        finally:
            with self._lock:
                self._loading = None

    def _load(self, name: str, old: RetrievalEngine, signature: tuple[int, ...]) -> RetrievalEngine | None:
        """The engine over `old`'s changed bundle, or None (logged) when it cannot be served in its place."""
        from tf_retrieval.config import ModelConfig
        from tf_retrieval.search.engine import RetrievalEngine

        started = time.perf_counter()
        try:
            config = ModelConfig.load(os.path.join(old.bundle_dir, "model.json"))
            if config.model_id() != old.config.model_id():
                self._seen[name] = signature
                logger.warning("the bundle of %s at %s now holds the model %s: restart the page to serve it", name,
                               old.bundle_dir, config.model_id())
                return None
            engine = RetrievalEngine.load(old.bundle_dir, embedder=old.embedder, data_dir=old.data_dir)
        except Exception:
            if bundle_signature(old.bundle_dir) == signature:  # a bad bundle, not a swap while reading: skip it
                self._seen[name] = signature
                logger.exception("could not reload the bundle of %s at %s: still serving the previous one", name,
                                 old.bundle_dir)
            return None
        if bundle_signature(old.bundle_dir) != signature:  # replaced while being read: read it again next time
            return None
        self._seen[name] = signature
        logger.info("reloaded %s from %s: %d images (was %d) in %.1f s", name, old.bundle_dir, len(engine), len(old),
                    time.perf_counter() - started)
        return engine
