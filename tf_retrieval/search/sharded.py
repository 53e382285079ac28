"""A sharded index: N index shards, each holding the ids that hash to it, searched in parallel and merged.

For collections beyond one machine's memory (or one index's build time), the vectors are split by id into shards of the
same backend (`exact`, `scann`). A search asks every shard for its own top k (in a thread pool: ScaNN and numpy release
Python's lock) and merges them by score, ties broken by id, so over exact shards the merged answer equals one exact
index over everything (tests/test_index.py checks it), up to float rounding: BLAS may round the same dot product
differently for a shard than for the whole, so vectors with truly equal scores (duplicates) can come out one ulp
apart and be ordered by that, not by id. Each shard is a complete index on disk (`<dir>/shard-00000/`,
its own manifest and checksums); the sharded manifest lists them. A shard directory can be copied to another machine
and searched there: the merge only needs each shard's (scores, ids).

`Index.load` and `build_index(..., shards=N)` return a `ShardedIndex`, so the engine, the CLI and the page take a
sharded bundle unchanged (`tfr index --shards N`).
"""
from __future__ import annotations

import concurrent.futures
import datetime
import os
from typing import Any, Sequence

import numpy as np

from tf_retrieval.errors import InvalidInputError, UnknownIdError
from tf_retrieval.search.index import BACKENDS, FORMAT_VERSION, MANIFEST, Index, _check_ids
from tf_retrieval.storage import atomic_directory, file_digest, write_json


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id: a 64-bit mix of the id (splitmix64's finaliser) modulo `shards`, so consecutive ids spread
    evenly and the assignment never depends on the order vectors arrive in."""
    with np.errstate(over="ignore"):
        x = np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(shards)).astype(np.int64)


class ShardedIndex(Index):
    """`shards` indexes of one backend behind the `Index` interface.

    Args:
      dim, metric: as `Index`.
      shards: number of shards (>= 1).
      shard_backend: "exact" or "scann" (each shard's backend).
      **options: the shard backend's options (e.g. ScaNN's `target_recall`).
    """

    backend = "sharded"

    def __init__(self, dim: int, metric: str = "cosine", *, shards: int = 2, shard_backend: str = "exact",
                 **options: Any):
        super().__init__(dim, metric)
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise InvalidInputError(f"shards must be a positive integer, got {shards!r}")
        if shard_backend not in BACKENDS or shard_backend == self.backend:
            raise InvalidInputError(f"unknown shard backend {shard_backend!r}; choose one of exact, scann")
        self.shards = [BACKENDS[shard_backend](dim, metric, **options) for _ in range(int(shards))]
        self.shard_backend, self.options = shard_backend, dict(options)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(self.shards), os.cpu_count() or 1),
                                                           thread_name_prefix="index-shard")

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def __repr__(self) -> str:
        return (f"ShardedIndex(dim={self.dim}, metric={self.metric!r}, count={len(self)}, "
                f"shards={len(self.shards)} x {self.shard_backend})")

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([shard.ids for shard in self.shards])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "shards": len(self.shards), "shard_backend": self.shard_backend,
                **self.options}

    def add(self, vectors: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        vectors, ids = self._check_vectors(vectors, "vectors"), _check_ids(ids)
        if len(ids) != len(vectors):
            raise InvalidInputError(f"{len(vectors)} vectors but {len(ids)} ids: give one id per vector")
        if len(np.unique(ids)) != len(ids):
            raise InvalidInputError("ids must be unique")
        with self._lock:
            present = np.concatenate([np.intersect1d(shard.ids, ids) for shard in self.shards])
            if len(present):
                raise InvalidInputError(f"{len(present)} id(s) already in the index, e.g. {present[:10].tolist()}; "
                                        "delete them first to replace their vectors")
            owner = shard_of(ids, len(self.shards))
            for number, shard in enumerate(self.shards):
                mine = owner == number
                if mine.any():
                    shard.add(vectors[mine], ids[mine])

    def delete(self, ids: np.ndarray | Sequence[int]) -> int:
        ids = np.unique(_check_ids(ids))
        with self._lock:
            owner = shard_of(ids, len(self.shards))
            unknown = [int(i) for number, shard in enumerate(self.shards)
                       for i in np.setdiff1d(ids[owner == number], shard.ids)]
            if unknown:
                raise UnknownIdError(f"{len(unknown)} id(s) not in the index: {unknown[:10]}; nothing was deleted")
            return sum(shard.delete(ids[owner == number]) for number, shard in enumerate(self.shards)
                       if (owner == number).any())

    def get_vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        ids = _check_ids(ids)
        owner = shard_of(ids, len(self.shards))
        out = np.zeros((len(ids), self.stored_width), self.stored_dtype)
        for number, shard in enumerate(self.shards):
            mine = owner == number
            if mine.any():
                out[mine] = shard.get_vectors(ids[mine])
        return out

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every non-empty shard's top k (in parallel; a shard smaller than k pads with -1), merged by score then id."""
        filled = [shard for shard in self.shards if len(shard)]
        answers = list(self._pool.map(lambda shard: shard.search(queries, k), filled))
        scores = np.concatenate([a[0] for a in answers], axis=1)
        ids = np.concatenate([a[1] for a in answers], axis=1)
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        return vectors  # each shard prepares the vectors it stores; queries are prepared once, below

    def save(self, directory: str | os.PathLike, *, model_id: str, extra: dict | None = None) -> None:
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInputError(f"model_id must be a non-empty string naming the embedding model, got {model_id!r}")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not (os.path.isdir(directory) and (
                not os.listdir(directory) or os.path.isfile(os.path.join(directory, MANIFEST)))):
            raise InvalidInputError(f"{directory} exists and is not an index (no {MANIFEST}); refusing to replace it")
        names = [f"shard-{number:05d}" for number in range(len(self.shards))]
        with atomic_directory(directory) as tmp, self._lock:
            for name, shard in zip(names, self.shards):
                shard.save(os.path.join(tmp, name), model_id=model_id)
            write_json(os.path.join(tmp, MANIFEST), {
                "format_version": FORMAT_VERSION, "backend": self.backend, "metric": self.metric, "dim": self.dim,
                "count": len(self), "model_id": model_id, "shards": names,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "files": {f"{name}/{MANIFEST}": file_digest(os.path.join(tmp, name, MANIFEST)) for name in names},
                "config": self.get_config(), "extra": extra or {}}, indent=1)

    @classmethod
    def load_sharded(cls, directory: str, manifest: dict, expected_model_id: str | None) -> ShardedIndex:
        """The sharded index saved at `directory` (`Index.load` calls this for a sharded manifest)."""
        index = cls(**{key: value for key, value in manifest["config"].items() if key != "backend"})
        for relative, digest in manifest["files"].items():
            path = os.path.join(directory, relative)
            if not os.path.isfile(path) or file_digest(path) != digest:
                raise InvalidInputError(f"{directory}: {relative} is missing or damaged; rebuild the index with "
                                        "`tfr index`")
        index.shards = [Index.load(os.path.join(directory, name), expected_model_id=expected_model_id)
                        for name in manifest["shards"]]
        if len(index) != manifest["count"]:
            raise InvalidInputError(f"{directory}: the shards hold {len(index)} vectors, the manifest says "
                                    f"{manifest['count']}; rebuild the index")
        return index


BACKENDS[ShardedIndex.backend] = ShardedIndex
