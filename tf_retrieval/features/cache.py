"""Batched feature extraction with a resumable on-disk cache.

Features are cached as `.npy` keyed by everything that changes them: the collection (its name, the exact list of image ids
and, for files, their sizes and modification times)
and the model key (backbone, image size, pooling, weights, or any other string the caller uses). Extraction runs in shards that
are saved as they finish, so an interrupted run resumes where it stopped; a second run reads the cache. A cache whose checksum,
shape or key does not match is reported and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.data.images import ImageCollection
from tf_retrieval.storage import atomic_write, exclusive_lock, file_digest, safe_name, write_json

logger = logging.getLogger(__name__)


def default_workdir() -> str:
    """Where artefacts (caches, models, indexes, reports) go: `$TFR_WORKDIR`, else `./artifacts`."""
    return os.environ.get("TFR_WORKDIR", "artifacts")


def collection_fingerprint(collection: ImageCollection) -> str:
    """A short hash of the collection's name and ordered image ids (names that are not UTF-8 as the bytes they were)."""
    digest = hashlib.sha256(os.fsencode(collection.name))
    for image_id in collection.ids:
        digest.update(b"\0" + os.fsencode(image_id))
    return digest.hexdigest()[:16]


def files_fingerprint(collection: ImageCollection) -> str | None:
    """A short hash of each image file's size and modification time (None for images held in memory, tfds): a picture
    replaced under the same name is extracted again, not answered from the cache."""
    if collection.paths is None:
        return None
    digest = hashlib.sha256()
    for path in collection.paths:
        try:
            info = os.stat(path)
            digest.update(b"%d:%d\0" % (info.st_size, info.st_mtime_ns))
        except OSError:
            digest.update(b"missing\0")  # reading it will say what is wrong
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str, collection: ImageCollection, model_key: str, image_size: int,
               dtype: str = "float32") -> str:
    """The `.npy` file holding the features of `collection` under `model_key` at `image_size` px in `dtype` (the
    `.json` beside it describes it)."""
    name = safe_name(os.path.basename(collection.name.rstrip("/")) or "collection")
    model = safe_name(model_key)
    return os.path.join(cache_dir, f"{name}-{collection_fingerprint(collection)}-{model}-{int(image_size)}px-{dtype}.npy")


def extract_features(collection: ImageCollection, model, *, image_size: int, model_key: str | None = None,
                     cache_dir: str | None = None, batch_size: int = 64, shard_size: int = 4096,
                     dtype: str = "float32", progress: bool = True) -> np.ndarray:
    """Runs `model` over every image of `collection` (in order) and returns the stacked outputs.

    Args:
      collection: the images.
      model: float32 pixels [b, image_size, image_size, 3] in 0..255 -> [b, ...]: a keras model (run in a
        `tf.function`), or any callable on numpy arrays (e.g. `features.litert.compile_model`'s).
      image_size: input size the images are resized to (`data.resize_and_crop`).
      model_key: a string naming the model's configuration; required with `cache_dir`.
      cache_dir: where to cache (None: no cache).
      batch_size: images per model call.
      shard_size: images per resumable shard when caching.
      dtype: dtype of the stored/returned features ("float32" or "float16").
      progress: show a tqdm progress bar.

    Returns:
      array [len(collection), ...] of `dtype`.
    """
    if len(collection) == 0:
        raise InvalidInputError(f"collection {collection.name!r} is empty: nothing to extract")
    if cache_dir is None:
        return _run(collection, model, image_size, batch_size, dtype, progress)
    if not model_key:
        raise InvalidInputError("extract_features: model_key is required when cache_dir is given (it keys the cache)")
    os.makedirs(cache_dir, exist_ok=True)
    path = cache_path(cache_dir, collection, model_key, image_size, dtype)
    key = {"collection": collection.name, "fingerprint": collection_fingerprint(collection), "count": len(collection),
           "files": files_fingerprint(collection), "model_key": model_key, "image_size": int(image_size),
           "dtype": dtype}
    with exclusive_lock(path[:-len(".npy")] + ".lock"):  # another process extracting the same: wait, then reuse
        cached = _load_cache(path, key)
        if cached is not None:
            logger.info("features from cache %s %s", path, cached.shape)
            return cached
        return _extract_in_shards(collection, model, path, key, batch_size, shard_size, progress)


def _extract_in_shards(collection: ImageCollection, model, path: str, key: dict, batch_size: int, shard_size: int,
                       progress: bool) -> np.ndarray:
    """Extracts shard by shard into `<path>.partial/` (kept across interruptions), then saves the whole at `path`."""
    image_size, dtype = key["image_size"], key["dtype"]
    shards_dir = path[:-len(".npy")] + ".partial"
    os.makedirs(shards_dir, exist_ok=True)
    _check_shards_key(shards_dir, key, shard_size)
    shards = []
    for shard, start in enumerate(range(0, len(collection), shard_size)):
        shard_file = os.path.join(shards_dir, f"shard_{shard:05d}.npy")
        indices = np.arange(start, min(start + shard_size, len(collection)))
        values = _load_shard(shard_file, len(indices))
        if values is None:
            desc = f"features {shard + 1}/{-(-len(collection) // shard_size)}"
            values = _run(collection.subset(indices), model, image_size, batch_size, dtype, progress, desc=desc)
            _atomic_save(shard_file, values)
        else:
            logger.info("resuming: shard %d already extracted", shard)
        shards.append(values)
    features = np.concatenate(shards)
    _atomic_save(path, features)
    write_json(path[:-len(".npy")] + ".json", {**key, "shape": list(features.shape), "sha256": file_digest(path)},
               indent=1)
    shutil.rmtree(shards_dir, ignore_errors=True)
    logger.info("cached features %s at %s", features.shape, path)
    return features


def _run(collection: ImageCollection, model, image_size: int, batch_size: int, dtype: str, progress: bool,
         desc: str = "features") -> np.ndarray:
    import tensorflow as tf
    from tqdm.auto import tqdm

    if isinstance(model, tf.keras.Model):
        keras_forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
        forward = lambda images: keras_forward(images).numpy()  # noqa: E731
    else:
        forward = lambda images: np.asarray(model(images))  # noqa: E731
    outputs = []
    with tqdm(total=len(collection), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images in collection.pixel_batches(image_size, batch_size):
            outputs.append(forward(images).astype(dtype, copy=False))
            bar.update(len(outputs[-1]))
    return np.concatenate(outputs)


def _load_cache(path: str, key: dict) -> np.ndarray | None:
    meta_path = path[:-len(".npy")] + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        problem = next(("its image files changed (size or modification time)" if name == "files" else
                        f"{name} is {meta.get(name)!r}, expected {value!r}" for name, value in key.items()
                        if meta.get(name) != value), None)
        if problem is None and file_digest(path) != meta.get("sha256"):
            problem = "checksum mismatch"
        if problem is None:
            features = np.load(path, allow_pickle=False)
            if list(features.shape) != meta.get("shape") or len(features) != key["count"]:
                problem = f"shape {features.shape} does not match {meta.get('shape')}"
            else:
                return features
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        problem = f"unreadable ({exc})"
    logger.warning("feature cache %s is damaged or stale (%s): rebuilding it", path, problem)
    for stale in (path, meta_path):
        if os.path.exists(stale):
            os.remove(stale)
    return None


def _check_shards_key(shards_dir: str, key: dict, shard_size: int) -> None:
    """Partial shards are only reused when they were made for the same key and shard size; otherwise they are cleared."""
    key_file = os.path.join(shards_dir, "key.json")
    expected = {**key, "shard_size": shard_size}
    try:
        with open(key_file) as f:
            if json.load(f) == expected:
                return
    except (OSError, ValueError):
        pass
    for name in os.listdir(shards_dir):
        os.remove(os.path.join(shards_dir, name))
    write_json(key_file, expected)


def _load_shard(path: str, count: int) -> np.ndarray | None:
    if not os.path.exists(path):
        return None
    try:
        values = np.load(path, allow_pickle=False)
        if len(values) == count:
            return values
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        pass
    logger.warning("partial shard %s is damaged: extracting it again", path)
    return None


def _atomic_save(path: str, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)
