"""Vector indexes: one small interface, two backends: exact (numpy, the ground truth) and Google ScaNN.

An index maps unique non-negative int64 ids to vectors of one dimension; it knows nothing of labels or images. Every
metric returns similarities, so a higher score is always closer:

- ``cosine``: inner product of L2-normalised vectors.
- ``pearson``: each vector minus its own mean, then cosine (the Pearson correlation of the two vectors).
- ``dot``: raw inner product.
- ``euclidean``: minus the squared L2 distance.
- ``hamming``: binary codes of `dim` bits, stored packed 8 to a byte (uint8 [n, ceil(dim / 8)]); minus the Hamming
  distance, ties broken by id (ascending), so results are deterministic. Exact backend only. Real-valued codes
  [n, dim] are packed on the way in (bit = value >= 0; `vectors.pack_codes`).

A vector with no direction (all zeros for cosine, constant for Pearson) is kept as a zero vector and scores 0 against
everything.

``save`` is atomic: the files go to a temp dir beside the target, are fsynced, and the temp dir then replaces the target in
one step (``renameat2(RENAME_EXCHANGE)`` where Linux offers it, else two renames that put the old index back on failure).
``manifest.json`` records the backend, metric, dimension, count, the id of the model whose embeddings these are and a sha256
per file. ``Index.load`` checks those checksums and refuses an index built from another model's embeddings.
"""
from __future__ import annotations

import abc
import datetime
import importlib
import json
import logging
import math
import operator
import os
import threading
from typing import Any, Sequence

import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingDependencyError, MissingError, ModelMismatchError, UnknownIdError
from tf_retrieval.storage import atomic_directory, digest_tree, file_digest, write_json
from tf_retrieval.vectors import code_bytes, hamming_distances, pack_codes

logger = logging.getLogger(__name__)

FLOAT_METRICS = ("cosine", "euclidean", "dot", "pearson")
METRICS = FLOAT_METRICS + ("hamming",)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK_BYTES = 256 * 1024 * 1024  # working memory of one ExactIndex search chunk
_MIN_TRAINING_POINTS = 256  # below this ScaNN's quantisers cannot be trained: use brute force
_SCANN_MODES = ("brute_force", "ah", "tree_ah")
_PARALLEL_QUERIES = 512  # ScaNN batches at least this big are searched on all cores


class IndexModelMismatchError(ModelMismatchError):
    """The index holds another model's embeddings than the model that would query it."""


class Index(abc.ABC):
    """Maps unique int64 ids to vectors; knows nothing of labels.

    Subclasses set `backend` and implement `_search`; they may override the `_after_add`, `_after_delete`,
    `_save_backend` and `_load_backend` hooks. Public methods are serialised by a lock, so one index can be shared by
    threads.

    Args:
      dim: vector dimension.
      metric: one of `METRICS`.
      **backend_options: options of the backend (see the subclass); the base class accepts none.

    Raises:
      ValueError: unknown metric or option, or a non-positive dimension.
    """

    backend = ""

    def __init__(self, dim: int, metric: str = "cosine", **backend_options: Any):
        if backend_options:
            raise InvalidInputError(f"unknown option(s) for the {self.backend} index: {', '.join(sorted(backend_options))}")
        if metric not in METRICS:
            raise InvalidInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise InvalidInputError(f"dim must be a positive integer, got {dim!r}")
        self.dim, self.metric = int(dim), metric
        self._vectors = np.zeros((0, self.stored_width), self.stored_dtype)  # as indexed (after `_prepare`)
        self._ids = np.zeros((0,), np.int64)
        self._row_of: dict[int, int] = {}
        self._lock = threading.RLock()

    # -- the interface -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, count={len(self)})"

    @property
    def stored_width(self) -> int:
        """Columns of a stored vector: `dim`, or bytes per packed code for Hamming."""
        return code_bytes(self.dim) if self.metric == "hamming" else self.dim

    @property
    def stored_dtype(self) -> np.dtype:
        """float32, or uint8 for packed Hamming codes."""
        return np.dtype(np.uint8 if self.metric == "hamming" else np.float32)

    @property
    def ids(self) -> np.ndarray:
        """The indexed ids (int64), in storage order."""
        return self._ids.copy()

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, plus "backend"; `from_config` inverts it."""
        return {"backend": self.backend, "dim": self.dim, "metric": self.metric}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Index:
        """An empty index from `get_config()` output; on `Index` itself the "backend" key picks the class."""
        config = dict(config)
        backend = config.pop("backend", cls.backend)
        if backend == "sharded":
            importlib.import_module("tf_retrieval.search.sharded")  # registers the backend
        if backend not in BACKENDS:
            raise InvalidInputError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        target = BACKENDS[backend]
        if not issubclass(target, cls):
            raise InvalidInputError(f"the config describes a {backend} index, not a {cls.backend} one")
        return target(**config)

    def add(self, vectors: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        """Adds vectors under new ids.

        Args:
          vectors: float array [n, dim].
          ids: n unique non-negative integers, none of them already in the index (delete an id first to replace its
            vector).

        Raises:
          ValueError: bad shapes or values, repeated ids, or ids already present.
        """
        vectors = self._check_vectors(vectors, "vectors")
        ids = _check_ids(ids)
        if len(ids) != len(vectors):
            raise InvalidInputError(f"{len(vectors)} vectors but {len(ids)} ids: give one id per vector")
        if len(np.unique(ids)) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise InvalidInputError(f"ids must be unique; repeated: {values[counts > 1][:10].tolist()}")
        if len(ids) == 0:
            return
        with self._lock:
            present = [int(i) for i in ids if int(i) in self._row_of]
            if present:
                raise InvalidInputError(f"{len(present)} id(s) already in the index, e.g. {present[:10]}; "
                                 "delete them first to replace their vectors")
            prepared = self._prepare(vectors)
            start = len(self._ids)
            self._vectors = np.concatenate([self._vectors, prepared])
            self._ids = np.concatenate([self._ids, ids])
            self._row_of.update((int(i), start + row) for row, i in enumerate(ids))
            self._after_add(ids, prepared)

    def delete(self, ids: np.ndarray | Sequence[int]) -> int:
        """Removes ids and their vectors.

        All or nothing: if any id is not in the index, nothing is removed and KeyError lists the unknown ids (repeats
        within `ids` are fine).

        Returns:
          the number of vectors removed.
        """
        ids = np.unique(_check_ids(ids))
        with self._lock:
            unknown = [int(i) for i in ids if int(i) not in self._row_of]
            if unknown:
                raise UnknownIdError(f"{len(unknown)} id(s) not in the index: {unknown[:10]}; nothing was deleted")
            if len(ids) == 0:
                return 0
            keep = ~np.isin(self._ids, ids)
            self._vectors, self._ids = self._vectors[keep], self._ids[keep]
            self._row_of = {int(i): row for row, i in enumerate(self._ids)}
            self._after_delete(ids)
        return len(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar indexed vectors of each query.

        Args:
          queries: float array [q, dim] (a single vector must be passed as [1, dim]).
          k: neighbours per query.

        Returns:
          (scores float32 [q, k], ids int64 [q, k]), best first (higher score = more similar). When fewer than k vectors
          are found (the index holds fewer than k, or an approximate search reached fewer) the remaining columns have
          id -1 and score -inf.

        Raises:
          ValueError: bad queries, k < 1, or an empty index.
        """
        queries = self._check_vectors(queries, "queries")
        try:
            k = operator.index(k)
        except TypeError:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}") from None
        if k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k}")
        with self._lock:
            if len(self) == 0:
                raise InvalidInputError("the index is empty: add vectors before searching")
            found = min(k, len(self))
            if len(queries) == 0:
                scores, ids = np.zeros((0, found), np.float32), np.zeros((0, found), np.int64)
            else:
                scores, ids = self._search(self._prepare(queries), found)
        if found < k:
            scores = np.pad(scores, ((0, 0), (0, k - found)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - found)), constant_values=-1)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def get_vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored vectors of `ids` [len(ids), dim], as indexed.

        That is L2-normalised for cosine, mean-centred then normalised for Pearson, and unchanged for dot and euclidean,
        so a stored vector used as a query ranks exactly as its original would.

        Raises:
          KeyError: some ids are not in the index.
        """
        ids = _check_ids(ids)
        with self._lock:
            unknown = [int(i) for i in ids if int(i) not in self._row_of]
            if unknown:
                raise UnknownIdError(f"{len(unknown)} id(s) not in the index: {unknown[:10]}")
            return self._vectors[[self._row_of[int(i)] for i in ids]].copy()

    def save(self, directory: str | os.PathLike, *, model_id: str, extra: dict | None = None) -> None:
        """Writes the index to `directory` atomically, replacing an index saved there before.

        Args:
          directory: target folder; it must not exist, be empty, or hold an index (it is never merged into).
          model_id: the model whose embeddings these are (e.g. "baseline:3"); `load` can insist on it.
          extra: JSON-serialisable information to keep in the manifest.

        Raises:
          ValueError: an empty model_id, or `directory` holds something other than an index.
          OSError: writing failed; any index already at `directory` is left as it was.
        """
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInputError(f"model_id must be a non-empty string naming the embedding model, got {model_id!r}")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not (os.path.isdir(directory) and (
                not os.listdir(directory) or os.path.isfile(os.path.join(directory, MANIFEST)))):
            raise InvalidInputError(f"{directory} exists and is not an index (no {MANIFEST}); refusing to replace it: "
                             "choose another directory")
        with atomic_directory(directory) as tmp, self._lock:
            _save_npy(os.path.join(tmp, "vectors.npy"), self._vectors)
            _save_npy(os.path.join(tmp, "ids.npy"), self._ids)
            self._save_backend(tmp)
            write_json(os.path.join(tmp, MANIFEST), {
                "format_version": FORMAT_VERSION, "backend": self.backend, "metric": self.metric, "dim": self.dim,
                "count": len(self), "model_id": model_id,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "files": digest_tree(tmp), "config": self.get_config(), "extra": extra or {}}, indent=1)
        logger.info("saved %r to %s (model %s)", self, directory, model_id)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, expected_model_id: str | None = None) -> Index:
        """Loads an index written by `save`; `Index.load` picks the backend from the manifest.

        Args:
          directory: the folder given to `save`.
          expected_model_id: if given, the model that will query the index; an index of another model is refused.

        Raises:
          FileNotFoundError: no index there.
          IndexModelMismatchError: the index holds another model's embeddings.
          ValueError: a damaged or missing file, or an unknown format.
        """
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise MissingError(f"no index at {directory} ({MANIFEST} missing): build one with `tfr index`")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            version, files, config = manifest["format_version"], manifest["files"], manifest["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{manifest_path} is damaged ({exc!r}); rebuild the index with `tfr index`") from None
        if version != FORMAT_VERSION:
            raise InvalidInputError(f"{directory}: index format {version} is not supported (this version reads "
                             f"{FORMAT_VERSION}); rebuild the index with `tfr index`")
        if expected_model_id is not None and manifest.get("model_id") != expected_model_id:
            raise IndexModelMismatchError(
                f"the index at {directory} holds embeddings of model {manifest.get('model_id')!r}, but the querying "
                f"model is {expected_model_id!r}: its scores would be meaningless. Rebuild the index with `tfr index` "
                "for this model")
        if manifest.get("backend") == "sharded":
            from tf_retrieval.search.sharded import ShardedIndex

            return ShardedIndex.load_sharded(directory, manifest, expected_model_id)
        for required in ("vectors.npy", "ids.npy"):
            if required not in files:
                raise InvalidInputError(f"{directory}: the manifest lists no {required}; rebuild the index with `tfr index`")
        for relative, digest in files.items():
            path = os.path.join(directory, relative)
            if not os.path.isfile(path):
                raise InvalidInputError(f"{directory}: file {relative} is missing; rebuild the index with `tfr index`")
            if file_digest(path) != digest:
                raise InvalidInputError(f"{directory}: file {relative} is damaged (sha256 differs from the manifest); "
                                 "rebuild the index with `tfr index`")
        index = cls.from_config(config)
        vectors = np.load(os.path.join(directory, "vectors.npy"), allow_pickle=False)
        ids = np.load(os.path.join(directory, "ids.npy"), allow_pickle=False)
        count = manifest.get("count")
        if (vectors.dtype != index.stored_dtype or vectors.shape != (count, index.stored_width) or ids.dtype != np.int64
                or ids.shape != (count,) or len(np.unique(ids)) != count):
            raise InvalidInputError(f"{directory}: vectors {vectors.dtype}{list(vectors.shape)} / ids {ids.dtype}"
                             f"{list(ids.shape)} do not match the manifest ({count} unique ids of dim {index.dim})")
        index._vectors, index._ids = vectors, ids
        index._row_of = {int(i): row for row, i in enumerate(ids)}
        index._load_backend(directory)
        logger.info("loaded %r from %s (model %s)", index, directory, manifest.get("model_id"))
        return index

    # -- for subclasses ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [q, k], best first, for prepared queries; 1 <= k <= len(self); pads with -inf / -1."""

    def _after_add(self, ids: np.ndarray, prepared: np.ndarray) -> None:
        """Called (under the lock) after new rows were appended."""

    def _after_delete(self, ids: np.ndarray) -> None:
        """Called (under the lock) after rows were removed."""

    def _save_backend(self, directory: str) -> None:
        """Writes backend files into `directory` (the temp dir of `save`); they get checksums like the rest."""

    def _load_backend(self, directory: str) -> None:
        """Reads what `_save_backend` wrote; vectors and ids are already loaded."""

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if self.metric == "hamming" and vectors.ndim == 2 and vectors.dtype == np.uint8 \
                and vectors.shape[1] == self.stored_width:
            return np.ascontiguousarray(vectors)  # packed codes
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            hint = " (wrap a single vector as v[None, :])" if vectors.ndim == 1 else ""
            raise InvalidInputError(f"{what} must have shape [n, {self.dim}], got {list(vectors.shape)}{hint}")
        if vectors.dtype.kind not in "fiu":
            raise InvalidInputError(f"{what} must be real numbers, got dtype {vectors.dtype}")
        vectors = vectors.astype(np.float32, copy=False)
        if not np.isfinite(vectors).all():
            bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
            raise InvalidInputError(f"{what} contain NaN or infinite values (rows {bad[:10].tolist()})")
        return pack_codes(vectors) if self.metric == "hamming" else vectors

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Maps vectors to the space where the metric is an inner product (cosine, Pearson) or stays as is."""
        if self.metric == "hamming":
            return vectors
        if self.metric == "pearson":
            vectors = vectors - vectors.mean(axis=1, keepdims=True)
        if self.metric in ("cosine", "pearson"):
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms > 0, norms, 1)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class ExactIndex(Index):
    """Exhaustive search with numpy float32 matrix products (byte popcounts for Hamming), in query chunks of bounded
    memory. The ground truth.

    Ties are broken by id (the smaller first), so a sharded exact index (`search.sharded`), which merges by score then
    id, answers as one exact index does, whatever order the ids were added in.
    """

    backend = "exact"

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        by_id = self._id_order()
        ids = self._ids if by_id is None else self._ids[by_id]
        n = len(ids)
        # ~24 bytes per (query, vector) pair: float32 scores, a partitioned copy, masks and a running count; 4 more to
        # put the scores in id order; Hamming's xor bytes and popcounts besides
        per_pair = 24 + (4 if by_id is not None else 0) + (5 * self._vectors.shape[1] if self.metric == "hamming" else 0)
        chunk = max(1, _CHUNK_BYTES // (per_pair * n))
        squared_norms = np.einsum("ij,ij->i", self._vectors, self._vectors) if self.metric == "euclidean" else None
        all_scores, all_ids = [], []
        for start in range(0, len(queries), chunk):
            scores = self._scores(queries[start:start + chunk], squared_norms)
            if by_id is not None:
                scores = scores[:, by_id]  # columns in id order: ties below keep it
            if k < n:
                top = _top_k_positions(scores, k)
                top_scores = np.take_along_axis(scores, top, axis=1)
                top = np.take_along_axis(top, np.lexsort((top, -top_scores), axis=1), axis=1)
            else:
                top = np.argsort(-scores, axis=1, kind="stable")
            all_scores.append(np.take_along_axis(scores, top, axis=1))
            all_ids.append(ids[top])
        return np.concatenate(all_scores), np.concatenate(all_ids)

    def _scores(self, queries: np.ndarray, squared_norms: np.ndarray | None) -> np.ndarray:
        """float32 [len(queries), len(self)], higher is closer: dot products, -|q - x|^2 (given the vectors' squared
        norms), or minus the Hamming distance."""
        if self.metric == "hamming":
            return (-hamming_distances(queries, self._vectors)).astype(np.float32)  # negated as ints: no -0.0
        scores = queries @ self._vectors.T
        if self.metric == "euclidean":  # -|q - x|^2 = 2 q.x - |x|^2 - |q|^2
            scores *= 2
            scores -= squared_norms[None, :]
            scores -= np.einsum("ij,ij->i", queries, queries)[:, None]
            np.minimum(scores, 0, out=scores)
        return scores

    def _id_order(self) -> np.ndarray | None:
        """Storage positions in id order; None when storage order is id order already (ids added ascending, as
        bundles add them)."""
        ids = self._ids
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
            return None
        return np.argsort(ids, kind="stable")


def _top_k_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """The positions of each row's k highest scores, unordered; of the scores tied at the cut-off, the leftmost
    (argpartition alone picks any of them, so a ranking k deep would not be the start of the full one)."""
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k]
    above = scores > kth[:, None]
    tied = scores == kth[:, None]
    room = k - np.count_nonzero(above, axis=1)
    keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room[:, None]))
    return np.nonzero(keep)[1].reshape(len(scores), k)


def scann_params(n: int, dim: int, metric: str = "cosine", mode: str | None = None,
                 target_recall: float | None = None) -> dict[str, Any]:
    """ScaNN settings for a collection of `n` vectors, following ScaNN's own guidance.

    - n < 20,000: ``brute_force`` (exact; already fast at this size).
    - 20,000 <= n < 100,000: ``ah``: asymmetric hashing with 2 dimensions per block (4 from `WIDE_DIM` dimensions
      up), then exact re-scoring of the best ``reorder`` = 500 candidates.
    - n >= 100,000, or from 20,000 vectors of `WIDE_DIM` dimensions or more: ``tree_ah``: k-means tree with
      num_leaves = round(sqrt(n)), searching 10% of the leaves (at least 20), then AH and re-scoring as above. (Scoring
      every AH code costs n x dim: on 50k x 1280 CIFAR-10 features a query took 2.0 ms with ``ah`` and 0.5 ms with
      ``tree_ah`` at the same recall@10 of 0.99.)

    The anisotropic quantisation threshold is 0.2 (ScaNN's value for normalised data) for cosine and Pearson and off for
    dot and euclidean, whose vectors have no fixed norm; the tree is spherical for normalised data. ``reorder`` is the
    number of candidates re-scored for the top 10; a search for k > 10 re-scores ``reorder * k / 10``, so recall holds
    for large k too (and at least k are re-scored for any k). On clustered normalised 64-d data these
    settings gave recall@10 of 0.99 (``ah``, 50k points) and 0.99 (``tree_ah``, 150k points) against exact search.

    ``target_recall`` trades that margin for speed (or buys more): it only changes the search-time settings, by band
    (the first band at or above the target), so one trained tree serves every target (`ScannIndex.tune`):

    ============  ==========================================  ===========================
    target        tree_ah leaves_to_search                     reorder (candidates, k=10)
    ============  ==========================================  ===========================
    <= 0.90       max(10, ceil(num_leaves / 40))               40
    <= 0.95       max(20, ceil(num_leaves / 20))               100
    <= 0.99       max(40, ceil(num_leaves / 8))                200
    > 0.99        max(80, ceil(num_leaves / 4))                500
    1.0           brute force (exact), unless `mode` is forced
    ============  ==========================================  ===========================

    Calibrated with ``benchmarks/index_bench.py`` (recall@10 against exact search, 1000 queries): on CIFAR-10 embeddings
    (EfficientNet-Lite0, PCA to 128-d) with sqrt(n) leaves, recall 0.90 took about 10 leaves, 0.95 about 17 (26 with 40
    candidates re-scored) and 0.99 about 26-38 with 100 candidates, at both 10k and 50k points: a roughly constant
    number of leaves while the tree grows, and 40 candidates capped recall at 0.97-0.985. ``ah`` reached 0.94-0.97
    with 40 candidates and 0.99 with 100. The minimums leave a margin over those figures; the fractions keep one for
    trees with far more leaves than measured (1M points). They are starting points, not guarantees: measure recall on
    your own data.

    Args:
      n: number of vectors.
      dim: their dimension.
      metric: one of `METRICS`.
      mode: force "brute_force", "ah" or "tree_ah" instead of choosing by size.
      target_recall: the recall@10 to aim at, in (0, 1]; None keeps the settings above (about 0.98-0.99).

    Returns:
      a dict with "mode" and that mode's settings.

    Raises:
      ValueError: unknown mode, or a target recall outside (0, 1].
    """
    if target_recall is not None:
        number = isinstance(target_recall, (int, float, np.floating)) and not isinstance(target_recall, bool)
        if not number or not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if mode is None:
        if target_recall == 1:
            mode = "brute_force"
        else:
            mode = "brute_force" if n < 20_000 else "ah" if n < 100_000 and dim < WIDE_DIM else "tree_ah"
    if mode not in _SCANN_MODES:
        raise InvalidInputError(f"unknown ScaNN mode {mode!r}; choose one of {', '.join(_SCANN_MODES)}")
    params: dict[str, Any] = {"mode": mode}
    if mode == "brute_force":
        return params
    normalised = metric in ("cosine", "pearson")
    params.update(dims_per_block=4 if dim >= WIDE_DIM else 2,
                  anisotropic_quantization_threshold=0.2 if normalised else None, reorder=500,
                  training_sample_size=max(1, min(n, 100_000 if mode == "tree_ah" and dim < WIDE_DIM
                                                  else AH_TRAINING_SAMPLE)))
    if mode == "tree_ah":
        leaves = max(1, int(round(math.sqrt(n))))
        params.update(num_leaves=leaves, leaves_to_search=min(leaves, max(20, math.ceil(leaves / 10))),
                      spherical=normalised, tree_training_sample_size=max(1, min(n, 250_000)))
    if target_recall is not None:
        band = next((b for b in _RECALL_BANDS if target_recall <= b[0]), _RECALL_BANDS[-1])
        _, minimum, fraction, reorder = band
        params["reorder"] = reorder
        if mode == "tree_ah":
            params["leaves_to_search"] = min(params["num_leaves"], max(minimum, math.ceil(params["num_leaves"] / fraction)))
    return params


#: From this dimension AH codes 4 dimensions per block instead of 2: on CIFAR-10 EfficientNet-Lite0 features (50k x
#: 1280, 500 held-out queries) recall@10 was 0.999 with 100 candidates re-scored either way, while a search took 1.0
#: instead of 2.3 ms and training 17 instead of 28 s.
WIDE_DIM = 256
#: Vectors the AH codebooks are trained on (with ``ah``, and with ``tree_ah`` on wide vectors): on the same data 20k
#: gave the recall of all 50k (1.000 with 100 candidates) in 9 instead of 17 s (``tree_ah``: 9 instead of 12 s).
AH_TRAINING_SAMPLE = 25_000
#: Candidates re-scored that `ScannIndex` tries when it calibrates its search on the indexed data.
REORDER_STEPS = (20, 40, 100, 200)
#: Shares of a tree's leaves that it tries to scan (``tree_ah``), with each of `REORDER_STEPS`.
LEAF_SHARES = (1 / 32, 1 / 16, 1 / 10, 1 / 7, 1 / 5, 1 / 4, 1 / 3)
#: What re-scoring one dimension of a candidate costs, in AH code lookups (a gather of float vectors from memory
#: against 16-way table lookups: measured on 50k x 1280, 4 dimensions per block).
RESCORE_COST = 4.0
#: The recall@10 that calibration aims at when no `target_recall` is given.
CALIBRATION_RECALL = 0.99
#: Below this dimension re-scoring is cheap (a candidate is a few hundred bytes): the default margin is kept.
CALIBRATION_MIN_DIM = 256

# (highest target recall of the band, minimum leaves to search, 1 / fraction of the leaves, candidates re-scored)
_RECALL_BANDS = ((0.90, 10, 40, 40), (0.95, 20, 20, 100), (0.99, 40, 8, 200), (1.0, 80, 4, 500))


class ScannIndex(Index):
    """Google ScaNN (`scann.scann_ops_pybind`).

    The searcher is trained lazily, at the first search or save. After that, `add` and `delete` go through ScaNN's own
    mutation API (`upsert` / `delete` by docid, which ScaNN 1.4.2 supports for brute force, AH and tree searchers), so a
    small change costs milliseconds instead of a retraining. The quantisers and the tree keep their original training, so
    once the mutations since the last training exceed `rebuild_fraction` of the trained size, or (with automatic params)
    the size moves into another `scann_params` band, the searcher is dropped and retrained at the next search.

    `save` stores ScaNN's own serialisation (loading it takes milliseconds, retraining can take minutes) beside
    `vectors.npy`, which stays the source of truth for `get_vectors` and retraining. ScaNN's pickled docid list is not
    kept: the docids are stored as an int64 array.

    Args:
      dim, metric: as `Index`.
      params: ScaNN settings: a dict with "mode" and any of that mode's keys from `scann_params` (missing keys get the
        `scann_params` value for the size at training time); None chooses everything by size.
      rebuild_fraction: retrain once mutations since the last training exceed this fraction of the trained size.
      target_recall: passed to `scann_params` at every training: the recall@10 the automatic (or missing) settings aim
        at; None keeps its defaults.
    """

    backend = "scann"

    def __init__(self, dim: int, metric: str = "cosine", *, params: dict[str, Any] | None = None,
                 rebuild_fraction: float = 0.25, target_recall: float | None = None, **backend_options: Any):
        super().__init__(dim, metric, **backend_options)
        if metric == "hamming":
            raise InvalidInputError("ScaNN does not search binary codes by Hamming distance: use the exact index "
                             "(backend 'exact' or 'auto')")
        scann_params(1, self.dim, metric, target_recall=target_recall)  # validates the target
        self.target_recall = target_recall
        if params is not None:
            params = dict(params)
            allowed = set(scann_params(10**6, self.dim, metric, mode=params.get("mode", "tree_ah")))
            unknown = sorted(set(params) - allowed)
            if "mode" not in params or unknown:
                raise InvalidInputError(f"ScaNN params need a 'mode' ({', '.join(_SCANN_MODES)}) and only that mode's keys "
                                 f"({', '.join(sorted(allowed))}); got unknown keys {unknown}")
        if not rebuild_fraction > 0:
            raise InvalidInputError(f"rebuild_fraction must be positive, got {rebuild_fraction}")
        self.params = params
        self.rebuild_fraction = float(rebuild_fraction)
        self._searcher: Any = None
        self._docid_map: tuple[Any, np.ndarray] | None = None  # (searcher, its docids as an array)
        self._built: dict[str, Any] = {}  # the params the searcher was trained with, its size, mutations since

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "params": self.params, "rebuild_fraction": self.rebuild_fraction}
        if self.target_recall is not None:  # only when set: indexes saved before the option load unchanged
            config["target_recall"] = self.target_recall
        return config

    @property
    def built_params(self) -> dict[str, Any] | None:
        """The settings of the current searcher (None before it is trained)."""
        return dict(self._built["params"]) if self._searcher is not None else None

    def rebuild(self) -> None:
        """(Re)trains the ScaNN searcher on the current vectors."""
        scann = _import_scann()
        with self._lock:
            n = len(self)
            if n == 0:
                self._searcher, self._built = None, {}
                return
            params = self._resolve_params(n)
            distance = "squared_l2" if self.metric == "euclidean" else "dot_product"
            builder = scann.scann_ops_pybind.builder(self._vectors, 10, distance)
            leaves = None
            if params["mode"] == "tree_ah":
                leaves = min(params["num_leaves"], max(1, n // 50))  # ScaNN's default minimum partition size is 50
                params["num_leaves"] = leaves  # what the tree has, as saved and reported
                builder = builder.tree(num_leaves=leaves, num_leaves_to_search=min(params["leaves_to_search"], leaves),
                                       training_sample_size=min(n, params["tree_training_sample_size"]),
                                       spherical=params["spherical"])
            if params["mode"] == "brute_force":
                builder = builder.score_brute_force()
            else:
                threshold = params["anisotropic_quantization_threshold"]
                builder = builder.score_ah(params["dims_per_block"],
                                           anisotropic_quantization_threshold=math.nan if threshold is None else threshold,
                                           training_sample_size=min(n, params["training_sample_size"]))
                builder = builder.reorder(params["reorder"])
            self._docid_map = None
            self._searcher = builder.build(docids=self._ids.tolist())
            self._built = {"params": params, "size": n, "mutations": 0, "leaves": leaves}
            given = self.params or {}
            if (params["mode"] != "brute_force" and self.dim >= CALIBRATION_MIN_DIM
                    and ("reorder" not in given or (leaves and "leaves_to_search" not in given))):
                self._calibrate_search()
        logger.info("trained a ScaNN searcher over %d vectors: %s", n, params)

    def _calibrate_search(self, sample: int = 200, k: int = 10) -> None:
        """Sets the search-time settings, `reorder` (of `REORDER_STEPS`, up to the size's default) and for a tree
        `leaves_to_search` (`LEAF_SHARES` of its leaves, and the default), to the cheapest pair whose recall@10 on
        `sample` probe queries reaches the target recall (`target_recall`, else `CALIBRATION_RECALL`). A setting given
        in `params` is kept. The cost of a pair is the AH codes scored plus the dimensions re-scored (`RESCORE_COST`).
        A probe is the midpoint of an indexed vector and its 5th nearest neighbour: near the data like a real query,
        but not on an indexed point (whose own code would make the search look easier than it is). Queries far from
        every indexed vector (another distribution) can get a lower recall: give the settings in `params` for them.

        Re-scoring reads the full vectors of every candidate, which costs most at high dimensions (measured on CIFAR-10
        EfficientNet-Lite0 features, 50k x 1280: 2.5 ms per query with 500 candidates, 1.2 ms with 100, both at
        recall 1.0), while how many candidates and leaves a recall needs depends on the data: so it is measured here,
        once per training, on the data itself. Only for dimensions of at least `CALIBRATION_MIN_DIM`: below, the
        default margin costs little.
        """
        params, n, leaves = self._built["params"], len(self), self._built["leaves"]
        if n <= k + 1:
            return
        rng = np.random.default_rng(0)
        rows = rng.choice(n, min(sample, n), replace=False)
        exact = ExactIndex(self.dim, "dot" if self.metric != "euclidean" else "euclidean")
        exact._vectors, exact._ids = self._vectors, np.arange(n)  # prepared vectors: dot products rank as the metric
        neighbours = exact._search(self._vectors[rows], 6)[1][:, 5]
        queries = (self._vectors[rows] + self._vectors[neighbours]) / 2
        if self.metric in ("cosine", "pearson"):
            queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        truth = self._ids[exact._search(queries, k)[1]]
        target = self.target_recall or CALIBRATION_RECALL
        given = self.params or {}
        default = params["reorder"]
        reorders = [default] if "reorder" in given else [step for step in REORDER_STEPS if step < default] + [default]
        scanned = [params.get("leaves_to_search")]
        if leaves and "leaves_to_search" not in given:
            scanned = sorted({min(leaves, math.ceil(leaves * share)) for share in LEAF_SHARES}
                             | {min(leaves, params["leaves_to_search"])})

        def cost(setting: tuple[int | None, int]) -> float:
            searched, reorder = setting
            codes = n * (searched / leaves if leaves else 1.0) * self.dim / params["dims_per_block"]
            return codes + RESCORE_COST * reorder * self.dim

        settings = sorted(((a, b) for a in scanned for b in reorders), key=cost)
        if len(scanned) > 1:  # tried last, where none of those reaches the target: half the leaves, then all
            settings += [(math.ceil(leaves * share), reorder) for share in (1 / 2, 1) for reorder in reorders
                         if math.ceil(leaves * share) > max(scanned)]
        best = None  # (recall, setting): where none reaches the target, the cheapest of the best recall is kept
        for searched, reorder in settings:
            params["reorder"] = reorder
            if leaves:
                params["leaves_to_search"] = searched
            found = self._search(queries, k)[1]
            recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)])
            if recall >= target:
                break
            if best is None or recall > best[0]:
                best = recall, (searched, reorder)
        else:
            recall, (searched, reorder) = best
            params["reorder"] = reorder
            if leaves:
                params["leaves_to_search"] = searched
        scans = f" scanning {params['leaves_to_search']} of {leaves} leaves" if leaves else ""
        logger.log(logging.INFO if recall >= target else logging.WARNING,
                   "ScaNN re-scores %d candidates per query%s: recall@%d %.3f on %d indexed vectors (target %.2f%s)",
                   params["reorder"], scans, k, recall, len(rows), target,
                   "" if recall >= target else ": not reached; an exact index (--backend exact) finds every neighbour")
        params["calibrated_recall"] = round(float(recall), 4)

    def tune(self, *, leaves_to_search: int | None = None, reorder: int | None = None) -> dict[str, Any]:
        """Changes the search-time settings of the trained searcher, without retraining it (microseconds).

        ScaNN decides per query how many tree leaves to scan and how many candidates to re-score exactly, so recall can
        be traded for speed on a trained index, e.g. to sweep a recall / QPS curve. The change applies to the current
        searcher and is saved with it (`save` / `load`); a retraining (`rebuild`, or after many mutations) goes back to
        `params` / `scann_params`: put a setting in `params` to keep it for good. Trains the searcher first if needed.

        Args:
          leaves_to_search: leaves scanned per query (``tree_ah`` only; more than the tree has means all of them).
          reorder: candidates re-scored exactly per query for k <= 10 (``ah`` and ``tree_ah``; ``reorder * k / 10``
            for a larger k).

        Returns:
          the searcher's settings after the change (as `built_params`).

        Raises:
          ValueError: a non-positive value, or a setting the trained mode does not have.
        """
        changes = {"leaves_to_search": leaves_to_search, "reorder": reorder}
        changes = {key: value for key, value in changes.items() if value is not None}
        for key, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InvalidInputError(f"{key} must be a positive integer, got {value!r}")
        with self._lock:
            if self._searcher is None:
                if len(self) == 0:
                    raise InvalidInputError("the index is empty: add vectors before tuning the search")
                self.rebuild()
            params = self._built["params"]
            unknown = sorted(set(changes) - set(params))
            if unknown:
                raise InvalidInputError(f"the trained ScaNN searcher ({params['mode']}) has no {', '.join(unknown)} setting")
            params.update({key: int(value) for key, value in changes.items()})
            return dict(params)

    def _resolve_params(self, n: int) -> dict[str, Any]:
        if self.params is None:
            params = scann_params(n, self.dim, self.metric, target_recall=self.target_recall)
        else:
            params = {**scann_params(n, self.dim, self.metric, mode=self.params["mode"],
                                     target_recall=self.target_recall), **self.params}
        if params["mode"] != "brute_force" and (n < _MIN_TRAINING_POINTS or self.dim < 2):
            logger.info("%d vectors of dim %d are too few to train ScaNN's %s: using brute force", n, self.dim,
                        params["mode"])
            params = {"mode": "brute_force"}
        return params

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._searcher is None:
            self.rebuild()
        params = self._built["params"]
        # `reorder` candidates for the top 10, proportionally more for a larger k (as many as k at least)
        pre_reorder = None if params["mode"] == "brute_force" else math.ceil(max(params["reorder"], k) * max(k, 10) / 10)
        leaves = {"leaves_to_search": params["leaves_to_search"]} if params["mode"] == "tree_ah" else {}
        # ScaNN's own wrapper maps its row numbers to docids in a Python loop (a third of the time of a fast batched
        # search): call the searcher underneath and map them with a numpy array instead.
        parallel = len(queries) >= _PARALLEL_QUERIES
        rows, distances = self._searcher.searcher.search_batched(
            queries, k, -1 if pre_reorder is None else pre_reorder, leaves.get("leaves_to_search", -1), parallel,
            256 if parallel else 0)
        docids = self._docid_array()
        rows = np.asarray(rows, dtype=np.int64).reshape(len(queries), k)
        ids = docids[np.clip(rows, 0, len(docids) - 1)]
        scores = np.asarray(distances, dtype=np.float32).reshape(len(queries), k)
        if self.metric == "euclidean":
            scores = -np.maximum(scores, 0)
        missing = np.isnan(scores) | (rows < 0) | (rows >= len(docids))  # ScaNN pads with NaN when it found < k
        ids[missing], scores[missing] = -1, -np.inf
        return scores, ids

    def _docid_array(self) -> np.ndarray:
        """The searcher's docids (row -> id) as an int64 array, rebuilt after mutations."""
        if self._docid_map is None or self._docid_map[0] is not self._searcher:
            self._docid_map = (self._searcher, np.asarray(self._searcher.docids, dtype=np.int64))
        return self._docid_map[1]

    def _after_add(self, ids: np.ndarray, prepared: np.ndarray) -> None:
        self._docid_map = None
        if self._searcher is not None:
            self._searcher.upsert(ids.tolist(), prepared)
            self._count_mutations(len(ids))

    def _after_delete(self, ids: np.ndarray) -> None:
        self._docid_map = None
        if self._searcher is not None:
            if len(self) == 0:
                self._searcher, self._built = None, {}
                return
            self._searcher.delete(ids.tolist())
            self._count_mutations(len(ids))

    def _count_mutations(self, count: int) -> None:
        self._built["mutations"] += count
        too_many = self._built["mutations"] > self.rebuild_fraction * self._built["size"]
        auto_mode = scann_params(len(self), self.dim, self.metric, target_recall=self.target_recall)["mode"]
        if too_many or (self.params is None and auto_mode != self._built["params"]["mode"]):
            logger.info("%d mutations since ScaNN was trained on %d vectors: retraining at the next search",
                        self._built["mutations"], self._built["size"])
            self._searcher, self._built = None, {}

    def _save_backend(self, directory: str) -> None:
        if len(self) == 0:
            return
        if self._searcher is None:
            self.rebuild()
        scann_dir = os.path.join(directory, "scann")
        os.makedirs(scann_dir)
        self._searcher.serialize(scann_dir, relative_path=True)
        os.remove(os.path.join(scann_dir, "scann_docids.pkl"))  # replaced by the array below (no pickle on load)
        _save_npy(os.path.join(scann_dir, "docids.npy"), np.asarray(self._searcher.docids, dtype=np.int64))
        write_json(os.path.join(scann_dir, "state.json"), self._built)

    def _load_backend(self, directory: str) -> None:
        scann_dir = os.path.join(directory, "scann")
        if not os.path.isdir(scann_dir):
            return  # saved empty: trained at the first search after adds
        scann = _import_scann()
        docids = np.load(os.path.join(scann_dir, "docids.npy"), allow_pickle=False)
        with open(os.path.join(scann_dir, "state.json"), encoding="utf-8") as f:
            built = json.load(f)
        if len(docids) != len(self) or not np.isin(docids, self._ids).all():
            raise InvalidInputError(f"{directory}: the ScaNN searcher's ids do not match ids.npy; rebuild the index")
        loaded = scann.scann_ops_pybind.load_searcher(scann_dir)
        self._searcher = scann.scann_ops_pybind.ScannSearcher(loaded.searcher, docids=docids.tolist())
        self._built = built


#: Index classes by backend name.
BACKENDS: dict[str, type[Index]] = {"exact": ExactIndex, "scann": ScannIndex}


def build_index(vectors: np.ndarray, ids: np.ndarray | Sequence[int] | None = None, *, metric: str = "cosine",
                backend: str = "auto", dim: int | None = None, shards: int = 1, **options: Any) -> Index:
    """An index over `vectors`.

    Args:
      vectors: float array [n, dim], or packed uint8 codes [n, ceil(bits / 8)] with `dim` for Hamming.
      ids: n unique non-negative integers; default 0..n-1.
      metric: one of `METRICS`.
      backend: "exact", "scann", or "auto" (ScaNN when it is installed, else exact; always exact for Hamming).
      dim: the dimension (bits for Hamming), when the vectors are packed codes; default vectors.shape[1].
      shards: more than 1 splits the vectors by id into that many indexes of `backend`, searched in parallel and
        merged (`search.sharded.ShardedIndex`).
      **options: backend options (`ScannIndex`: params, rebuild_fraction, target_recall); with "auto" and no scann
        installed they are ignored (logged).

    Raises:
      ValueError: unknown backend or option, bad vectors or ids.
      ImportError: backend "scann" without scann installed.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise InvalidInputError(f"build_index needs vectors of shape [n, dim], got {list(vectors.shape)}")
    if backend == "auto" and metric == "hamming":
        backend = "exact"
    if backend == "auto":
        try:
            _import_scann()
            backend = "scann"
        except ImportError:
            logger.info("scann is not installed: using the exact index")
            backend = "exact"
            if options:
                logger.warning("the exact index ignores the ScaNN options %s", sorted(options))
                options = {}
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown index backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if dim is None:
        dim = vectors.shape[1] * 8 if metric == "hamming" and vectors.dtype == np.uint8 else vectors.shape[1]
    if shards > 1:
        from tf_retrieval.search.sharded import ShardedIndex

        index = ShardedIndex(dim, metric, shards=shards, shard_backend=backend, **options)
    else:
        index = BACKENDS[backend](dim, metric=metric, **options)
    index.add(vectors, np.arange(len(vectors), dtype=np.int64) if ids is None else ids)
    return index


# -- helpers ----------------------------------------------------------------------------------------------------------
def _import_scann():
    try:
        import scann
    except ImportError as exc:
        raise MissingDependencyError(f'the ScaNN index backend needs scann: pip install "tf_retrieval[scann]" ({exc})') from None
    return scann


def _check_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros((0,), np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InvalidInputError(f"ids must be a 1-d array of integers, got {ids.dtype} of shape {list(ids.shape)}")
    if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
        raise InvalidInputError(f"ids must fit in int64, got {ids.max()}")
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        raise InvalidInputError(f"ids must be non-negative (-1 marks a missing result), got {ids.min()}")
    return ids


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
