"""The query-time retrieval engine: an embedder, an index over a collection, and the collection's metadata.

An *index bundle* on disk (written by `build_bundle`, read by `RetrievalEngine.load`):

    <bundle>/model.json     the ModelConfig that embedded the collection
    <bundle>/catalog.json   source of the collection + ids, labels, class names (index ids are positions in this list)
    <bundle>/index/         the vector index (`index.Index.save`), its manifest naming the model id
    <bundle>/images/        for sources held in memory (tfds): the catalog's images packed in one memory-mapped file
                            (`data.images.PackedImages`), so loading a bundle does not re-read the dataset; a cache,
                            written on first load and rewritten when the catalog changes

The index knows only vectors; labels and images are resolved through the catalog and the collection. A bundle built
with database augmentation (`build_bundle(augment=k)`, `tfr index --dba K`) indexes each image's α-DBA vector (its
embedding averaged with its k nearest others, `search.query.augment_database`) and says so in the catalog key
`database_augmentation` ({"k", "alpha"}); images added later are augmented against the index they join.

`add_images` / `delete_images` (`tfr index --add/--delete`) change a bundle in place without rebuilding its index (the
index's own add/delete, ScaNN's mutation API). They add three optional catalog keys, absent from a bundle that was never
changed:

    index_ids        the index id of each catalog entry (else its position); deleted entries leave gaps
    origins          where each entry comes from: 0 the bundle's `source`, i > 0 `added_sources[i - 1]`
    added_sources    [{"source": absolute folder path}] of images added from other folders; their ids are the absolute
                     file paths (the source's own images keep their relative ids), so ids stay unique

and save the whole bundle atomically (a new bundle folder swapped in for the old one).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Sequence

import numpy as np

from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import (ImageCollection, PackedImages, decode_image, is_file_pattern, load_dataset,
                                      load_tfds, pattern_root)
from tf_retrieval.errors import InvalidInputError, MissingError, UnknownIdError
from tf_retrieval.search.index import Index, build_index
from tf_retrieval.storage import atomic_directory, value_digest, write_json
from tf_retrieval.vectors import finish

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
      index_ids: the index id of each collection image (a bundle changed by `add_images` / `delete_images`); None when
        index ids are positions in the collection. Results and `vectors` always speak of positions.
      runtime: of the in-process embedder (`features.embedding.Embedder`): one of `features.litert.RUNTIMES`.
      database_augmentation: {"k", "alpha"} when the index holds α-DBA vectors (`build_bundle(augment=k)`), else None.
    """

    def __init__(self, config: ModelConfig, collection: ImageCollection, index: Index, embedder=None,
                 index_ids: Sequence[int] | np.ndarray | None = None, runtime: str = "litert",
                 database_augmentation: dict | None = None):
        if len(index) > len(collection):
            raise InvalidInputError(f"index holds {len(index)} vectors but the collection only {len(collection)} images")
        self.config = config
        self.collection = collection
        self.index = index
        self.database_augmentation = database_augmentation
        self._embedder = embedder
        self.runtime = runtime
        self.bundle_dir: str | None = None  # set by `load`, with its data_dir: where to reload the bundle from
        self.data_dir: str | None = None
        self._index_ids: np.ndarray | None = None
        self._position_of: dict[int, int] | None = None
        if index_ids is not None:
            index_ids = np.asarray(index_ids, dtype=np.int64)
            if index_ids.shape != (len(collection),):
                raise InvalidInputError(f"{len(index_ids)} index ids for a collection of {len(collection)} images")
            self._index_ids = index_ids
            self._position_of = {int(i): position for position, i in enumerate(index_ids)}

    @property
    def embedder(self):
        if self._embedder is None:
            from tf_retrieval.features.embedding import Embedder

            self._embedder = Embedder(self.config, runtime=self.runtime)
        return self._embedder

    @property
    def name(self) -> str:
        return self.config.name

    def __len__(self) -> int:
        return len(self.index)

    def embed(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> the vectors this index holds (decoding errors raise `data.images.ImageDecodeError`).

        A remote embedder's outputs get the same finishing as in-process ones (`vectors.finish`)."""
        images = [decode_image(data, name=f"image {i}") for i, data in enumerate(encoded)]  # the same clear errors
        if hasattr(self.embedder, "embed_images"):  # in process: decoded once
            return self.embedder.embed_images(images)
        return finish(self.embedder.embed_bytes(list(encoded)), self.config.hash_bits)

    def positions_of(self, index_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The collection positions of index ids (they differ once a bundle has been changed by `update_bundle`).

        Raises:
          KeyError: an id that is not in the catalog.
        """
        index_ids = np.asarray(index_ids, dtype=np.int64)
        if self._position_of is None:
            if len(index_ids) and (index_ids.min() < 0 or index_ids.max() >= len(self.collection)):
                raise UnknownIdError(f"index ids outside the collection of {len(self.collection)} images")
            return index_ids.copy()
        try:
            return np.array([self._position_of[int(i)] for i in index_ids], dtype=np.int64)
        except KeyError as exc:
            raise UnknownIdError(f"index id {exc.args[0]} is not in the catalog") from None

    def vectors(self, positions: Sequence[int]) -> np.ndarray:
        """The stored embeddings of database images at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        return self.index.get_vectors(positions if self._index_ids is None else self._index_ids[positions])

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
        queries = np.atleast_2d(np.asarray(queries))
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        if expand > 0 and self.index.metric == "hamming":
            raise InvalidInputError("query expansion averages float vectors: a hashing model's binary codes cannot be "
                                    "expanded (use expand=0)")
        allowed = None if classes is None else set(int(c) for c in classes)
        excluded = set(int(p) for p in exclude)
        total = len(self.index)
        if expand > 0:
            from tf_retrieval.search.query import expand_with_index

            queries = expand_with_index(self.index, queries, expand, alpha)
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
            if self._position_of is not None and position >= 0:
                position = self._position_of.get(position, -1)
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

    @classmethod
    def load(cls, bundle_dir: str, embedder=None, data_dir: str | None = None, runtime: str = "litert") -> RetrievalEngine:
        """Loads a bundle written by `build_bundle`; the collection is re-read from its source and checked against the
        catalog, and an `embedder` that is a model server's client (`serving.client.connect`) against the index's
        embedding space."""
        config = ModelConfig.load(os.path.join(bundle_dir, "model.json"))
        catalog = _read_catalog(bundle_dir)
        index = Index.load(os.path.join(bundle_dir, "index"), expected_model_id=config.model_id())
        if hasattr(embedder, "check_embedding_space"):  # a model server's client: are its vectors the index's?
            embedder.check_embedding_space(config.embedding_space(), f"the index at {bundle_dir}")
        collection = _stored_collection(bundle_dir, catalog, data_dir or catalog.get("data_dir"))
        engine = cls(config, collection, index, embedder, index_ids=catalog.get("index_ids"), runtime=runtime,
                     database_augmentation=catalog.get("database_augmentation"))
        engine.bundle_dir, engine.data_dir = os.path.abspath(bundle_dir), data_dir
        return engine


def check_metric(config: ModelConfig, metric: str | None, augment: int = 0) -> str:
    """The index metric for `config`: `metric`, or the model's own (`ModelConfig.metric`) when None.

    Raises:
      InvalidInputError: Hamming distance for a float model, or another metric for a hashing model's codes; database
        augmentation (`augment` > 0) with another metric than cosine, or a negative `augment`.
    """
    from tf_retrieval.search.index import METRICS

    metric = metric or config.metric
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if (metric == "hamming") != bool(config.hash_bits):
        raise InvalidInputError(f"metric {metric!r} does not fit model {config.name!r}: "
                                + (f"its {config.hash_bits}-bit codes are compared by Hamming distance (metric hamming)"
                                   if config.hash_bits else "Hamming distance needs a hashing model (hash_bits)"))
    if augment < 0 or (augment and metric != "cosine"):
        raise InvalidInputError(f"database augmentation (dba {augment}) needs k >= 0 and the cosine metric "
                                f"(it averages unit vectors), not {metric}")
    return metric


def resolve_bundle(name: str, workdir: str) -> str:
    """The folder of the index bundle `name`: `name` itself when it is a bundle folder, else `<workdir>/indexes/<name>`.

    Raises:
      MissingError: neither exists; the message says where it looked and lists the bundles that do exist.
    """
    if os.path.isfile(os.path.join(name, "catalog.json")):
        return name
    root = os.path.join(workdir, "indexes")
    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, "catalog.json")):
        return path
    found = sorted(entry for entry in os.listdir(root) if os.path.isfile(os.path.join(root, entry, "catalog.json"))) \
        if os.path.isdir(root) else []
    listing = f"the indexes there are: {', '.join(found)}" if found else "there are no indexes there"
    raise MissingError(f"no index bundle {name!r}: looked for {os.path.abspath(path)} ({listing}); point --workdir "
                       "(or TFR_WORKDIR) at the work directory that holds it, give the bundle's folder, or build it "
                       "with `tfr index`")


def index_collection(collection: ImageCollection, config: ModelConfig, bundle_dir: str, *, source: str,
                     data_dir: str | None = None, metric: str | None = None, backend: str = "auto",
                     index_options: dict | None = None, workdir: str | None = None, batch_size: int = 64,
                     progress: bool = True, runtime: str = "litert", augment: int = 0,
                     alpha: float = 3.0) -> RetrievalEngine:
    """Embeds `collection` with `config` (`features.embedding.embed_collection` in `runtime`, backbone outputs cached
    under `workdir`) and saves an index bundle of it (`build_bundle`); returns the engine over it."""
    from tf_retrieval.features.embedding import embed_collection

    metric = check_metric(config, metric, augment)  # before the costly part
    vectors = embed_collection(collection, config, workdir=workdir, batch_size=batch_size, progress=progress,
                               runtime=runtime)
    engine = build_bundle(bundle_dir, config, collection, vectors, source=source, data_dir=data_dir, metric=metric,
                          backend=backend, index_options=index_options, augment=augment, alpha=alpha)
    engine.runtime = runtime
    return engine


def build_bundle(bundle_dir: str, config: ModelConfig, collection: ImageCollection, embeddings: np.ndarray, *,
                 source: str, data_dir: str | None = None, metric: str | None = None, backend: str = "auto",
                 index_options: dict | None = None, augment: int = 0, alpha: float = 3.0) -> RetrievalEngine:
    """Indexes `embeddings` (one row per image of `collection`, from `features.embedding`) and saves the bundle
    atomically (a bundle already at `bundle_dir` is replaced in one step); returns the engine over it.

    Args:
      metric: the index similarity; default `config.metric` (cosine, or Hamming for a hashing model). A hashing model
        can only be searched by Hamming distance, and only a hashing model by Hamming distance.
      index_options: go to `index.build_index` (e.g. {"target_recall": 0.95} for ScaNN).
      augment, alpha: index α database-side augmented vectors over `augment` neighbours (0: the embeddings as they
        are; `search.query.augment_database`, exact, so its cost grows with the square of the collection).

    Raises:
      InvalidInputError: embeddings that do not match the collection, or a metric that does not fit the model (or
        the augmentation).
    """
    metric = check_metric(config, metric, augment)
    if len(embeddings) != len(collection):
        raise InvalidInputError(f"{len(embeddings)} embeddings for {len(collection)} images")
    augmentation = {}
    if augment:
        from tf_retrieval.search.query import augment_database

        embeddings = augment_database(embeddings, augment, alpha)
        augmentation = {"database_augmentation": {"k": int(augment), "alpha": float(alpha)}}
    index = build_index(embeddings, np.arange(len(collection)), metric=metric, backend=backend,
                        dim=config.hash_bits or None, **(index_options or {}))
    catalog = {"source": source, "data_dir": data_dir, "splits": sorted(set(collection.splits.tolist())),
               "ids": collection.ids, "labels": collection.labels.tolist(),
               "class_names": collection.class_names, "skipped": collection.skipped, **augmentation}
    _write_bundle(bundle_dir, index, catalog, config)
    logger.info("index bundle %s: %d images, model %s", bundle_dir, len(collection), config.model_id())
    return RetrievalEngine(config, collection, index, database_augmentation=catalog.get("database_augmentation"))


def _load_source(catalog: dict, data_dir: str | None) -> ImageCollection:
    """The catalog's collection: its folder (listed, not decoded again: the catalog holds the images that decoded when
    they were indexed, and one damaged since fails where it is read), or only the tfds splits it indexed."""
    source = catalog["source"]
    if is_file_pattern(source):  # named from the catalog, not listed again (a bucket may hold millions of files)
        root = pattern_root(source)
        return ImageCollection(name=source, ids=list(catalog["ids"]), labels=catalog["labels"],
                               class_names=catalog["class_names"], splits=["all"] * len(catalog["ids"]),
                               paths=[root + image_id for image_id in catalog["ids"]])
    if os.path.isdir(source) or source.startswith("folder:") or not catalog.get("splits"):
        return load_dataset(source, data_dir=data_dir, validate=False)
    return load_tfds(source, data_dir=data_dir, splits=catalog["splits"])


def _catalog_collection(catalog: dict, data_dir: str | None) -> ImageCollection:
    """The images of the catalog, in catalog order, re-read from their sources and checked against the catalog."""
    primary = _load_source(catalog, data_dir)
    added = catalog.get("added_sources") or []
    if not added:
        positions = {image_id: i for i, image_id in enumerate(primary.ids)}
        missing = [image_id for image_id in catalog["ids"] if image_id not in positions]
        if missing:
            raise InvalidInputError(f"{len(missing)} indexed image(s) are no longer in {catalog['source']} (e.g. {missing[:3]}): "
                             "the collection changed since the index was built; rebuild it with `tfr index`")
        return primary.subset([positions[image_id] for image_id in catalog["ids"]])
    parts = [primary] + [load_dataset(source["source"], validate=False) for source in added]
    lookups = [{image_id: i for i, image_id in enumerate(part.ids)} for part in parts]
    origins = catalog.get("origins") or [0] * len(catalog["ids"])
    picks, missing = [], []
    for image_id, origin in zip(catalog["ids"], origins):
        local = image_id if origin == 0 else os.path.relpath(image_id, added[origin - 1]["source"])
        position = lookups[origin].get(local)
        if position is None:
            missing.append(image_id)
        picks.append((parts[origin], position))
    if missing:
        raise InvalidInputError(f"{len(missing)} indexed image(s) are no longer in their folders (e.g. {missing[:3]}): the "
                         "collection changed since the index was built; remove them with `tfr index --delete` or rebuild "
                         "the index with `tfr index`")
    in_memory = primary.encoded is not None  # a tfds source: read the added files too
    images = [part.read_bytes(p) if in_memory else part.paths[p] for part, p in picks]
    return ImageCollection(name=primary.name, ids=list(catalog["ids"]), labels=np.asarray(catalog["labels"]),
                           class_names=list(catalog["class_names"]),
                           splits=np.array([part.splits[p] for part, p in picks], dtype=str),
                           encoded=images if in_memory else None, paths=None if in_memory else images)


IMAGE_STORE = "images"


def _stored_collection(bundle_dir: str, catalog: dict, data_dir: str | None) -> ImageCollection:
    """The catalog's collection from the bundle's image store when it matches the catalog, else from its sources
    (`_catalog_collection`), then stored for the next load when its images are held in memory (tfds sources)."""
    store = os.path.join(bundle_dir, IMAGE_STORE)
    key = value_digest([catalog["source"], catalog["ids"], catalog.get("origins"), catalog.get("added_sources")])
    try:
        with open(os.path.join(store, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest["catalog_digest"] == key:
            return ImageCollection(name=manifest["name"], ids=list(catalog["ids"]), labels=np.asarray(catalog["labels"]),
                                   class_names=list(catalog["class_names"]), splits=np.asarray(manifest["splits"]),
                                   encoded=PackedImages.load(store))
    except (OSError, ValueError, KeyError, InvalidInputError) as exc:
        if not isinstance(exc, FileNotFoundError):
            logger.warning("bundle %s: image store unusable (%s); re-reading the images from their source", bundle_dir, exc)
    collection = _catalog_collection(catalog, data_dir)
    if collection.encoded is not None:
        try:
            with atomic_directory(store) as tmp:
                PackedImages.pack(collection.encoded).save(tmp)
                write_json(os.path.join(tmp, "manifest.json"), {"catalog_digest": key, "name": collection.name,
                                                                 "splits": collection.splits.tolist()})
        except OSError as exc:  # a read-only bundle still loads, from its source
            logger.warning("bundle %s: could not write its image store (%s)", bundle_dir, exc)
    return collection


#: What every bundle's catalog holds (`build_bundle`).
_CATALOG_KEYS = ("source", "ids", "labels", "class_names")


def _read_catalog(bundle_dir: str) -> dict:
    path = os.path.join(bundle_dir, "catalog.json")
    try:
        with open(path) as f:
            catalog = json.load(f)
    except FileNotFoundError:
        raise MissingError(f"{bundle_dir} is not an index bundle: {path} is missing; build one with `tfr index`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} is damaged ({exc}); rebuild the bundle with `tfr index`") from None
    missing = [key for key in _CATALOG_KEYS if key not in catalog] if isinstance(catalog, dict) else list(_CATALOG_KEYS)
    if missing:
        raise InvalidInputError(f"{path} is damaged (it lacks {', '.join(missing)}); rebuild the bundle with `tfr index`")
    return catalog


def _source_key(source: str) -> str:
    if source.startswith("folder:"):
        source = source[len("folder:"):]
    return os.path.realpath(source) if os.path.isdir(source) else source


def _catalog_ids(catalog: dict, added_sources: list[dict], collection: ImageCollection) -> tuple[int, list[str]]:
    """(origin, catalog ids) of `collection`'s images; registers a new folder in `added_sources`."""
    if _source_key(collection.name) == _source_key(catalog["source"]):
        return 0, list(collection.ids)
    if collection.paths is None:
        raise InvalidInputError(f"cannot add images of {collection.name!r} to a bundle of {catalog['source']!r}: only the "
                         "bundle's own source or image folders can be added")
    root = os.path.realpath(collection.name)
    origin = next((i + 1 for i, source in enumerate(added_sources) if source["source"] == root), None)
    if origin is None:
        added_sources.append({"source": root})
        origin = len(added_sources)
    return origin, [os.path.join(root, image_id) for image_id in collection.ids]


def pending_images(bundle_dir: str, collection: ImageCollection, deleted: Sequence[str] = ()) -> ImageCollection:
    """The images of `collection` that the bundle does not hold yet, or will not once `deleted` are removed (embed
    only these before `add_images` / `update_bundle`)."""
    catalog = _read_catalog(bundle_dir)
    _, ids = _catalog_ids(catalog, [dict(s) for s in catalog.get("added_sources") or []], collection)
    present = set(catalog["ids"]) - set(deleted)
    return collection.subset([i for i, image_id in enumerate(ids) if image_id not in present])


def update_bundle(bundle_dir: str, *, add: ImageCollection | None = None, embeddings: np.ndarray | None = None,
                  delete: Sequence[str] = ()) -> dict:
    """Deletes and adds images of an index bundle without rebuilding its index, then saves the bundle atomically.

    The index changes through its own `add` / `delete` (for ScaNN the mutation API: no retraining until the mutations
    exceed `ScannIndex.rebuild_fraction` of the trained size). Deletes run first, so an id both deleted and added gets
    its new vector. The new bundle is written to a temp folder beside the old one and swapped in one step (as
    `Index.save`), so a failure or a crash leaves either the old or the new bundle, never a mix.

    Args:
      bundle_dir: a bundle written by `build_bundle`.
      add: images to add: the bundle's own source (e.g. its folder with new files in it) or another image folder
        (`data.image_folder`); images already in the catalog are skipped (`pending_images` leaves them out before
        embedding). Class names are matched by name; new ones are appended.
      embeddings: one row per image of `add`, from the bundle's model (`model.json`); in a bundle built with database
        augmentation they are augmented over their nearest images already indexed.
      delete: catalog ids of images to remove (as listed by `tfr search` or the catalog).

    Returns:
      {"added": [ids], "skipped": [ids already in the bundle], "deleted": [ids], "count": images in the bundle}.

    Raises:
      KeyError: some ids to delete are not in the bundle (nothing is changed).
      ValueError: embeddings that do not match `add`, or a source that cannot be added.
      index.IndexModelMismatchError: the bundle's index holds another model's embeddings than model.json.
      OSError: saving failed; the bundle is left as it was.
    """
    config = ModelConfig.load(os.path.join(bundle_dir, "model.json"))
    catalog = _read_catalog(bundle_dir)
    index = Index.load(os.path.join(bundle_dir, "index"), expected_model_id=config.model_id())
    ids, labels = list(catalog["ids"]), list(catalog["labels"])
    index_ids = list(catalog.get("index_ids") or range(len(ids)))
    origins = list(catalog.get("origins") or [0] * len(ids))
    added_sources = [dict(s) for s in catalog.get("added_sources") or []]
    class_names = list(catalog["class_names"])

    delete = list(dict.fromkeys(str(image_id) for image_id in delete))
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    unknown = [image_id for image_id in delete if image_id not in row_of]
    if unknown:
        raise UnknownIdError(f"{len(unknown)} image id(s) not in the bundle: {unknown[:10]}; nothing was changed")
    if delete:
        dropped = {row_of[image_id] for image_id in delete}
        index.delete([index_ids[row] for row in sorted(dropped)])
        keep = [row for row in range(len(ids)) if row not in dropped]
        ids, labels = [ids[r] for r in keep], [labels[r] for r in keep]
        index_ids, origins = [index_ids[r] for r in keep], [origins[r] for r in keep]

    added, skipped = [], []
    if add is not None:
        if embeddings is None or len(embeddings) != len(add):
            raise InvalidInputError(f"{0 if embeddings is None else len(embeddings)} embeddings for {len(add)} images to add")
        origin, new_ids = _catalog_ids(catalog, added_sources, add)
        present = set(ids)
        rows = [i for i, image_id in enumerate(new_ids) if image_id not in present]
        skipped = [image_id for image_id in new_ids if image_id in present]
        label_of = []
        for name in add.class_names:
            if name not in class_names:
                class_names.append(name)
            label_of.append(class_names.index(name))
        if rows:
            start = max(max(index_ids, default=-1), int(index.ids.max()) if len(index) else -1) + 1
            fresh = list(range(start, start + len(rows)))
            vectors = np.asarray(embeddings)[rows]
            augmentation = catalog.get("database_augmentation")
            if augmentation:  # against the images already indexed (not each other): as α-QE over the index
                from tf_retrieval.search.query import expand_with_index

                vectors = expand_with_index(index, vectors, augmentation["k"], augmentation["alpha"])
            index.add(vectors, np.asarray(fresh, dtype=np.int64))
            added = [new_ids[i] for i in rows]
            ids += added
            labels += [label_of[int(add.labels[i])] for i in rows]
            index_ids += fresh
            origins += [origin] * len(rows)
            if origin == 0 and catalog.get("splits"):  # more tfds splits of the source: load them too
                catalog["splits"] = sorted(set(catalog["splits"]) | set(add.splits[rows].tolist()))
        known = [list(entry) for entry in catalog.get("skipped") or []]
        catalog["skipped"] = known + [list(entry) for entry in add.skipped if list(entry) not in known]
    if not added and not delete:
        return {"added": [], "skipped": skipped, "deleted": [], "count": len(ids)}
    used = sorted({origin for origin in origins if origin > 0})  # forget folders no image comes from any more
    renumber = {old: new for new, old in enumerate(used, start=1)}
    added_sources = [added_sources[old - 1] for old in used]
    origins = [renumber.get(origin, 0) for origin in origins]
    catalog.update(ids=ids, labels=labels, class_names=class_names, index_ids=index_ids, origins=origins,
                   added_sources=added_sources)
    _write_bundle(bundle_dir, index, catalog, config)
    logger.info("bundle %s: %d added, %d deleted, %d images", bundle_dir, len(added), len(delete), len(ids))
    return {"added": added, "skipped": skipped, "deleted": delete, "count": len(ids)}


def add_images(bundle_dir: str, collection: ImageCollection, embeddings: np.ndarray) -> dict:
    """Adds images (one embedding row each, from the bundle's model) to a bundle; see `update_bundle`."""
    return update_bundle(bundle_dir, add=collection, embeddings=embeddings)


def delete_images(bundle_dir: str, ids: Sequence[str]) -> dict:
    """Removes images (catalog ids) from a bundle; see `update_bundle`."""
    return update_bundle(bundle_dir, delete=ids)


def update_from_folder(bundle_dir: str, *, add_folder: str | None = None, delete: Sequence[str] = (),
                       workdir: str | None = None, batch_size: int = 64, runtime: str = "litert") -> dict:
    """`tfr index --add/--delete`: embeds the images of `add_folder` that the bundle does not hold yet with the
    bundle's own model (its model.json), then adds them and removes the `delete` ids (`update_bundle`).

    Returns:
      `update_bundle`'s result, plus "already" (images of the folder already indexed) and "unreadable" ([path,
      reason] of files of the folder that could not be read).
    """
    from tf_retrieval.data.images import load_dataset
    from tf_retrieval.features.embedding import embed_collection

    add = vectors = None
    already, unreadable = 0, []
    if add_folder:
        if not os.path.isdir(add_folder):
            raise MissingError(f"image folder not found: {add_folder}")
        collection = load_dataset(add_folder)
        unreadable = [list(entry) for entry in collection.skipped]
        add = pending_images(bundle_dir, collection, deleted=delete)
        already = len(collection) - len(add)
        config = ModelConfig.load(os.path.join(bundle_dir, "model.json"))
        vectors = (embed_collection(add, config, workdir=workdir, batch_size=batch_size, runtime=runtime) if len(add)
                   else np.zeros((0, 1), np.float32))
    result = update_bundle(bundle_dir, add=add, embeddings=vectors, delete=delete)
    return {**result, "already": already, "unreadable": unreadable}


def _write_bundle(bundle_dir: str, index: Index, catalog: dict, config: ModelConfig) -> None:
    """Writes model.json, catalog.json and the index (+ copies of other files of an existing bundle) to a temp folder
    and swaps it in for the bundle: a crash leaves the old bundle or the new one, never a mix."""
    bundle_dir = os.path.abspath(bundle_dir)
    with atomic_directory(bundle_dir) as tmp:
        if os.path.isdir(bundle_dir):
            for entry in os.listdir(bundle_dir):
                if entry in ("index", "catalog.json", "model.json", IMAGE_STORE):
                    continue
                source = os.path.join(bundle_dir, entry)
                if os.path.isdir(source):
                    shutil.copytree(source, os.path.join(tmp, entry))
                else:
                    shutil.copy2(source, os.path.join(tmp, entry))
        index.save(os.path.join(tmp, "index"), model_id=config.model_id())
        write_json(os.path.join(tmp, "catalog.json"), catalog)
        config.save(os.path.join(tmp, "model.json"))
