"""The query-time retrieval engine: an embedder, an index over a collection, and the collection's metadata.

An *index bundle* on disk (written by `build_bundle`, read by `RetrievalEngine.load`):

    <bundle>/model.json     the ModelConfig that embedded the collection
    <bundle>/catalog.json   source of the collection + ids, labels, class names (index ids are positions in this list)
    <bundle>/index/         the vector index (`index.Index.save`), its manifest naming the model id

The index knows only vectors; labels and images are resolved through the catalog and the collection.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import numpy as np

from tf_retrieval.config import ModelConfig
from tf_retrieval.data import ImageCollection, decode_image, load_dataset, load_tfds
from tf_retrieval.index import Index, build_index

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchResult:
    """One neighbour: its position in the collection, id, class and similarity score (higher is more similar)."""

    position: int
    id: str
    label: int
    class_name: str
    score: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RetrievalEngine:
    """Answers image queries against one indexed collection with one embedding model.

    Args:
      config: the model that produced the index vectors.
      collection: the indexed images; index ids are positions in it.
      index: the vector index.
      embedder: anything with `embed_bytes(list[bytes]) -> np.ndarray` (in-process `Embedder`, or the TF Serving client).
        None builds the in-process embedder on first use.
    """

    def __init__(self, config: ModelConfig, collection: ImageCollection, index: Index, embedder=None):
        if len(index) > len(collection):
            raise ValueError(f"index holds {len(index)} vectors but the collection only {len(collection)} images")
        self.config = config
        self.collection = collection
        self.index = index
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from tf_retrieval.embedder import Embedder

            self._embedder = Embedder(self.config)
        return self._embedder

    @property
    def name(self) -> str:
        return self.config.name

    def __len__(self) -> int:
        return len(self.index)

    def embed(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> embeddings [n, d] (decoding errors raise `data.ImageDecodeError`)."""
        for i, data in enumerate(encoded):  # validate here so a remote embedder gets the same clear errors
            decode_image(data, name=f"image {i}")
        return np.asarray(self.embedder.embed_bytes(list(encoded)), dtype=np.float32)

    def vectors(self, positions: Sequence[int]) -> np.ndarray:
        """The stored embeddings of database images at `positions`."""
        return self.index.get_vectors(np.asarray(positions, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int = 10, *, threshold: float | None = None,
               classes: Sequence[int] | None = None, exclude: Sequence[int] = (), expand: int = 0,
               alpha: float = 3.0) -> list[list[SearchResult]]:
        """The top-k neighbours of each query vector.

        Args:
          queries: float32 [q, d] (or [d] for one query).
          k: results per query.
          threshold: keep only results with score >= threshold.
          classes: keep only results whose label is in `classes`.
          exclude: positions never returned (e.g. the query image itself).
          expand: α query expansion: re-query with the query plus its `expand` best neighbours (0: off).
          alpha: weight exponent of α-QE (0: average query expansion).

        Returns:
          one list of at most k `SearchResult` per query, best first.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        allowed = None if classes is None else set(int(c) for c in classes)
        excluded = set(int(p) for p in exclude)
        total = len(self.index)
        if expand > 0:
            from tf_retrieval.expansion import alpha_query_expansion

            scores, ids = self.index.search(queries, min(expand, total))
            known = np.where(ids >= 0, ids, ids.max())  # padding (-1) gets weight 0 below
            neighbours = self.index.get_vectors(known.ravel()).reshape(ids.shape + (-1,))
            queries = alpha_query_expansion(queries, neighbours, np.where(ids >= 0, scores, -np.inf), alpha)
        fetch = min(total, k + len(excluded))
        while True:
            scores, ids = self.index.search(queries, max(fetch, 1))
            results = [self._filter(row_scores, row_ids, k, threshold, allowed, excluded)
                       for row_scores, row_ids in zip(scores, ids)]
            # Filters can drop results: fetch more until every query has k, or the whole index was searched.
            if fetch >= total or all(len(result) >= k or (threshold is not None and row[-1] < threshold)
                                     for result, row in zip(results, scores)):
                return results
            fetch = min(total, fetch * 4)

    def _filter(self, scores, ids, k, threshold, allowed, excluded) -> list[SearchResult]:
        results = []
        for score, position in zip(scores, ids):
            position = int(position)
            if position < 0 or position in excluded or (threshold is not None and score < threshold):
                continue
            label = int(self.collection.labels[position])
            if allowed is not None and label not in allowed:
                continue
            results.append(SearchResult(position, self.collection.ids[position], label,
                                        self.collection.class_names[label], float(score)))
            if len(results) == k:
                break
        return results

    def search_images(self, encoded: Sequence[bytes], k: int = 10, **filters) -> list[list[SearchResult]]:
        """Embeds encoded images and searches for each (see `search` for the filters)."""
        return self.search(self.embed(encoded), k, **filters)

    def search_position(self, position: int, k: int = 10, **filters) -> list[SearchResult]:
        """Neighbours of a database image (the image itself left out)."""
        if not 0 <= position < len(self.collection):
            raise IndexError(f"no image at position {position}: the collection has {len(self.collection)}")
        exclude = set(filters.pop("exclude", ())) | {position}
        return self.search(self.vectors([position]), k, exclude=sorted(exclude), **filters)[0]

    @classmethod
    def load(cls, bundle_dir: str, embedder=None, data_dir: str | None = None) -> RetrievalEngine:
        """Loads a bundle written by `build_bundle`; the collection is re-read from its source and checked against the catalog."""
        config = ModelConfig.load(os.path.join(bundle_dir, "model.json"))
        catalog_path = os.path.join(bundle_dir, "catalog.json")
        try:
            with open(catalog_path) as f:
                catalog = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{bundle_dir} is not an index bundle: {catalog_path} is missing") from None
        index = Index.load(os.path.join(bundle_dir, "index"), expected_model_id=config.model_id())
        collection = _load_source(catalog, data_dir or catalog.get("data_dir"))
        positions = {image_id: i for i, image_id in enumerate(collection.ids)}
        missing = [image_id for image_id in catalog["ids"] if image_id not in positions]
        if missing:
            raise ValueError(f"{len(missing)} indexed image(s) are no longer in {catalog['source']} (e.g. {missing[:3]}): "
                             "the collection changed since the index was built; rebuild it with `tfr index`")
        collection = collection.subset([positions[image_id] for image_id in catalog["ids"]])
        return cls(config, collection, index, embedder)


def build_bundle(bundle_dir: str, config: ModelConfig, collection: ImageCollection, embeddings: np.ndarray, *,
                 source: str, data_dir: str | None = None, metric: str = "cosine", backend: str = "auto") -> RetrievalEngine:
    """Indexes `embeddings` (one row per image of `collection`) and saves the bundle; returns the engine over it."""
    if len(embeddings) != len(collection):
        raise ValueError(f"{len(embeddings)} embeddings for {len(collection)} images")
    index = build_index(embeddings, np.arange(len(collection)), metric=metric, backend=backend)
    index.save(os.path.join(bundle_dir, "index"), model_id=config.model_id())
    config.save(os.path.join(bundle_dir, "model.json"))
    catalog = {"source": source, "data_dir": data_dir, "splits": sorted(set(collection.splits.tolist())),
               "ids": collection.ids, "labels": collection.labels.tolist(),
               "class_names": collection.class_names, "skipped": collection.skipped}
    tmp = os.path.join(bundle_dir, "catalog.json.tmp")
    with open(tmp, "w") as f:
        json.dump(catalog, f)
    os.replace(tmp, os.path.join(bundle_dir, "catalog.json"))
    logger.info("index bundle %s: %d images, model %s", bundle_dir, len(collection), config.model_id())
    return RetrievalEngine(config, collection, index)


def _load_source(catalog: dict, data_dir: str | None) -> ImageCollection:
    """The catalog's collection: its folder, or only the tfds splits it indexed."""
    source = catalog["source"]
    if os.path.isdir(source) or source.startswith("folder:") or not catalog.get("splits"):
        return load_dataset(source, data_dir=data_dir)
    return load_tfds(source, data_dir=data_dir, splits=catalog["splits"])
