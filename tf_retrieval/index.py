"""Vector indexes: one small interface, two backends — exact (numpy, the ground truth) and Google ScaNN.

An index maps int64 ids to vectors and knows nothing of labels or images. Scores are similarities for every metric (higher
is closer): cosine and Pearson (cosine of mean-centred vectors) as the inner product of normalised vectors, dot as the raw
inner product, euclidean as minus the squared L2 distance.

`save(dir)` is atomic (a temp dir beside the target, fsynced, then renamed into place) and writes `manifest.json` with the
backend, metric, dimension, count, the id of the model whose embeddings these are, and a sha256 per file. `Index.load` checks the
checksums and refuses an index built by another model than the one that will query it.
"""
from __future__ import annotations

import abc
import datetime
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean", "dot", "pearson")
FORMAT_VERSION = 1
_MAX_CHUNK_BYTES = 256 * 1024 * 1024


class IndexModelMismatchError(ValueError):
    """The index was built from another model's embeddings than the one querying it."""


def _sha256(path: str) -> str:
    from tf_retrieval.features import file_sha256

    return file_sha256(path)


class Index(abc.ABC):
    """Base class: maps unique int64 ids to vectors of one dimension.

    Subclasses implement `_search_prepared(queries, k)` over the prepared (metric-transformed) vectors and may override
    `_on_change`, `_save_backend` and `_load_backend`.

    Args:
      dim: vector dimension.
      metric: one of `METRICS`.
    """

    backend = "base"

    def __init__(self, dim: int, metric: str = "cosine"):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.metric = int(dim), metric
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._ids = np.zeros((0,), np.int64)
        self._row_of: dict[int, int] = {}

    # -- the interface ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """The indexed ids, in storage order."""
        return self._ids.copy()

    def add(self, vectors: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        """Adds vectors [n, dim] under unique new int ids; an id already present raises ValueError."""
        vectors = self._check_vectors(vectors, "vectors")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique; the batch repeats some")
        present = [int(i) for i in ids if int(i) in self._row_of]
        if present:
            raise ValueError(f"ids already in the index: {present[:10]}; delete them first to replace their vectors")
        prepared = self._prepare(vectors)
        start = len(self._ids)
        self._vectors = np.concatenate([self._vectors, prepared])
        self._ids = np.concatenate([self._ids, ids])
        self._row_of.update((int(i), start + row) for row, i in enumerate(ids))
        self._on_add(ids, prepared)

    def delete(self, ids: np.ndarray | Sequence[int]) -> int:
        """Removes ids; returns how many were removed. Unknown ids raise KeyError naming them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        unknown = [int(i) for i in ids if int(i) not in self._row_of]
        if unknown:
            raise KeyError(f"ids not in the index: {unknown[:10]}")
        ids = np.unique(ids)
        keep = ~np.isin(self._ids, ids)
        self._vectors, self._ids = self._vectors[keep], self._ids[keep]
        self._row_of = {int(i): row for row, i in enumerate(self._ids)}
        self._on_delete(ids)
        return len(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar indexed vectors of each query.

        Returns:
          (scores float32 [q, k], ids int64 [q, k]), best first. When the index holds fewer than k vectors the missing
          columns have id -1 and score -inf.
        """
        queries = self._check_vectors(np.atleast_2d(queries), "queries")
        if int(k) <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if len(self) == 0:
            raise ValueError("the index is empty: add vectors before searching")
        k = int(k)
        found = min(k, len(self))
        scores, ids = self._search_prepared(self._prepare(queries), found)
        if found < k:
            pad = k - found
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def get_vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored vectors of `ids` as indexed (L2-normalised for cosine, centred and normalised for Pearson)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        unknown = [int(i) for i in ids if int(i) not in self._row_of]
        if unknown:
            raise KeyError(f"ids not in the index: {unknown[:10]}")
        return self._vectors[[self._row_of[int(i)] for i in ids]]

    def get_config(self) -> dict[str, Any]:
        return {"backend": self.backend, "dim": self.dim, "metric": self.metric}

    def save(self, directory: str, *, model_id: str, extra: dict | None = None) -> None:
        """Writes the index atomically to `directory` (replacing any index there) with its manifest."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            np.save(os.path.join(tmp, "vectors.npy"), self._vectors)
            np.save(os.path.join(tmp, "ids.npy"), self._ids)
            self._save_backend(tmp)
            files = {}
            for root, _, names in os.walk(tmp):
                for name in sorted(names):
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
                    files[os.path.relpath(path, tmp)] = _sha256(path)
            manifest = {"format_version": FORMAT_VERSION, "backend": self.backend, "metric": self.metric, "dim": self.dim,
                        "count": len(self), "model_id": model_id, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                        "files": files, "config": self.get_config(), "extra": extra or {}}
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
                os.rename(directory, os.path.join(old, "index"))
            os.rename(tmp, directory)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved %s index of %d vectors to %s", self.backend, len(self), directory)

    @classmethod
    def load(cls, directory: str, *, expected_model_id: str | None = None) -> Index:
        """Loads an index saved by `save`, checking the checksums and (if given) the model id.

        Raises:
          FileNotFoundError: no index there.
          IndexModelMismatchError: the index was built by another model.
          ValueError: a damaged file or an unknown format.
        """
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"no index at {directory} (manifest.json missing): build one with `tfr index`")
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: index format {manifest.get('format_version')} is not supported "
                             f"(expected {FORMAT_VERSION}); rebuild it with `tfr index`")
        if expected_model_id is not None and manifest["model_id"] != expected_model_id:
            raise IndexModelMismatchError(
                f"the index at {directory} holds embeddings of model {manifest['model_id']!r}, but the querying model is "
                f"{expected_model_id!r}; rebuild the index with `tfr index` for this model")
        for name, digest in manifest["files"].items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path) or _sha256(path) != digest:
                raise ValueError(f"{directory}: file {name} is missing or damaged (checksum mismatch); rebuild the index")
        backends = {c.backend: c for c in (ExactIndex, ScannIndex)}
        if manifest["backend"] not in backends:
            raise ValueError(f"{directory}: unknown index backend {manifest['backend']!r}")
        target = backends[manifest["backend"]]
        if cls is not Index and not issubclass(target, cls):
            raise ValueError(f"{directory} holds a {manifest['backend']} index, not a {cls.backend} one")
        config = dict(manifest["config"])
        config.pop("backend", None)
        index = target(**config)
        index._vectors = np.load(os.path.join(directory, "vectors.npy"), allow_pickle=False)
        index._ids = np.load(os.path.join(directory, "ids.npy"), allow_pickle=False)
        index._row_of = {int(i): row for row, i in enumerate(index._ids)}
        index._load_backend(directory)
        return index

    # -- for subclasses ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _search_prepared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [q, k] for prepared queries, 1 <= k <= len(self)."""

    def _on_add(self, ids: np.ndarray, prepared: np.ndarray) -> None:
        pass

    def _on_delete(self, ids: np.ndarray) -> None:
        pass

    def _save_backend(self, directory: str) -> None:
        pass

    def _load_backend(self, directory: str) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------------------------------------
    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape [n, {self.dim}], got {list(vectors.shape)}")
        if not np.issubdtype(vectors.dtype, np.number):
            raise ValueError(f"{what} must be numeric, got dtype {vectors.dtype}")
        vectors = vectors.astype(np.float32, copy=False)
        if not np.isfinite(vectors).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return vectors

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Maps vectors into the space where the metric is an inner product (cosine, Pearson) or stays as is."""
        if self.metric == "pearson":
            vectors = vectors - vectors.mean(axis=1, keepdims=True)
        if self.metric in ("cosine", "pearson"):
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class ExactIndex(Index):
    """Exhaustive search with numpy matrix products, in query chunks of bounded memory. The ground truth."""

    backend = "exact"

    def _search_prepared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._vectors)
        chunk = max(1, _MAX_CHUNK_BYTES // (4 * n))
        all_scores, all_ids = [], []
        squared_norms = (self._vectors ** 2).sum(axis=1) if self.metric == "euclidean" else None
        for start in range(0, len(queries), chunk):
            block = queries[start:start + chunk]
            scores = block @ self._vectors.T
            if squared_norms is not None:  # -(|q|^2 - 2 q.x + |x|^2)
                scores = 2 * scores - squared_norms[None, :] - (block ** 2).sum(axis=1, keepdims=True)
            if k < n:
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(n), (len(block), n))
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            all_scores.append(np.take_along_axis(top_scores, order, axis=1))
            all_ids.append(self._ids[np.take_along_axis(top, order, axis=1)])
        return np.concatenate(all_scores), np.concatenate(all_ids)


def scann_params(n: int, dim: int, metric: str = "cosine") -> dict[str, Any]:
    """ScaNN settings chosen from the collection size, following ScaNN's own guidance.

    - n < 20,000: brute force (exact, and already fast at this size).
    - 20,000 <= n < 100,000: asymmetric hashing (2 dims per block; anisotropic threshold 0.2 for inner products) with
      exact re-ranking of the top 100.
    - n >= 100,000: tree partitioning with num_leaves ~ sqrt(n), searching ~5% of the leaves (at least 10), then AH and
      re-ranking of the top 250.
    """
    if n < 20_000:
        return {"mode": "brute_force"}
    params: dict[str, Any] = {"mode": "ah", "dims_per_block": 2, "reorder": 100,
                              "anisotropic_quantization_threshold": 0.2 if metric != "euclidean" else None,
                              "training_sample_size": min(n, 100_000)}
    if n >= 100_000:
        leaves = int(round(math.sqrt(n)))
        params.update(mode="tree_ah", num_leaves=leaves, leaves_to_search=max(10, leaves // 20), reorder=250,
                      training_sample_size=min(n, 250_000))
    return params


class ScannIndex(Index):
    """Google ScaNN. Built lazily at the first search; adds and deletes after that go through ScaNN's own mutation API
    (`upsert` / `delete`), so no full rebuild is needed; `rebuild()` re-trains from the stored vectors.

    Args:
      dim, metric: as `Index`.
      params: ScaNN settings (see `scann_params`); None chooses them from the size at build time.
      num_neighbors: default neighbours per query the searcher is configured for.
    """

    backend = "scann"

    def __init__(self, dim: int, metric: str = "cosine", params: dict | None = None, num_neighbors: int = 10):
        super().__init__(dim, metric)
        self.params = dict(params) if params else None
        self.num_neighbors = int(num_neighbors)
        self._searcher = None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "params": self.params, "num_neighbors": self.num_neighbors}

    @property
    def built_params(self) -> dict[str, Any]:
        """The settings the searcher uses (explicit `params`, else the automatic choice for the current size)."""
        return self.params or scann_params(len(self), self.dim, self.metric)

    def rebuild(self) -> None:
        """(Re)trains the ScaNN searcher on the current vectors."""
        scann = _import_scann()
        p = self.built_params
        distance = "squared_l2" if self.metric == "euclidean" else "dot_product"
        builder = scann.scann_ops_pybind.builder(self._vectors, self.num_neighbors, distance)
        if p["mode"] == "tree_ah":
            leaves = min(p["num_leaves"], max(1, len(self) // 2))
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=min(p["leaves_to_search"], leaves),
                                   training_sample_size=min(len(self), p["training_sample_size"]))
        if p["mode"] in ("ah", "tree_ah"):
            threshold = p.get("anisotropic_quantization_threshold")
            builder = builder.score_ah(p["dims_per_block"], anisotropic_quantization_threshold=(
                float("nan") if threshold is None else threshold), training_sample_size=min(len(self),
                                                                                            p["training_sample_size"]))
            builder = builder.reorder(p["reorder"])
        else:
            builder = builder.score_brute_force()
        self._searcher = builder.build(docids=[str(int(i)) for i in self._ids])
        logger.info("built ScaNN searcher over %d vectors: %s", len(self), p)

    def _search_prepared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._searcher is None:
            self.rebuild()
        p = self.built_params
        reorder = max(k, p.get("reorder", k)) if p["mode"] != "brute_force" else None
        neighbours, distances = self._searcher.search_batched(queries, final_num_neighbors=k,
                                                              pre_reorder_num_neighbors=reorder)
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        for row, (found, dist) in enumerate(zip(neighbours, distances)):
            ids[row, :len(found)] = [int(d) for d in found]
            scores[row, :len(found)] = -np.asarray(dist) if self.metric == "euclidean" else dist
        return scores, ids

    def _on_add(self, ids: np.ndarray, prepared: np.ndarray) -> None:
        if self._searcher is not None:
            self._searcher.upsert([str(int(i)) for i in ids], prepared)

    def _on_delete(self, ids: np.ndarray) -> None:
        if self._searcher is not None:
            if len(self) == 0:
                self._searcher = None
            else:
                self._searcher.delete([str(int(i)) for i in ids])

    def _save_backend(self, directory: str) -> None:
        if len(self) == 0:
            return
        if self._searcher is None:
            self.rebuild()
        scann_dir = os.path.join(directory, "scann")
        os.makedirs(scann_dir)
        self._searcher.serialize(scann_dir, relative_path=True)

    def _load_backend(self, directory: str) -> None:
        scann_dir = os.path.join(directory, "scann")
        if os.path.isdir(scann_dir):
            self._searcher = _import_scann().scann_ops_pybind.load_searcher(scann_dir)


def _import_scann():
    try:
        import scann
    except ImportError as exc:
        raise ImportError(f'the ScaNN backend needs scann: pip install "tf_retrieval[scann]" ({exc})') from None
    return scann


def build_index(vectors: np.ndarray, ids: np.ndarray | Sequence[int] | None = None, *, metric: str = "cosine",
                backend: str = "auto", **options) -> Index:
    """Builds an index over `vectors` (ids default to 0..n-1).

    backend: "exact", "scann", or "auto" (ScaNN when it is installed, else exact).
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"build_index needs a non-empty [n, dim] array, got shape {list(vectors.shape)}")
    if backend == "auto":
        try:
            _import_scann()
            backend = "scann"
        except ImportError:
            backend = "exact"
    classes = {"exact": ExactIndex, "scann": ScannIndex}
    if backend not in classes:
        raise ValueError(f"unknown index backend {backend!r}; choose one of auto, {', '.join(classes)}")
    index = classes[backend](vectors.shape[1], metric=metric, **options)
    index.add(vectors, np.arange(len(vectors)) if ids is None else ids)
    return index
