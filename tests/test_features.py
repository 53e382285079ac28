import json
import os

import keras
import numpy as np
import pytest

from tf_retrieval.data.images import image_folder
from tf_retrieval.features.cache import cache_path, extract_features


def mean_colours(collection):
    return np.stack([collection.image(i).reshape(-1, 3).mean(axis=0) for i in range(len(collection))])


@pytest.fixture
def collection(image_dir):
    return image_folder(image_dir, progress=False)


def test_features_follow_collection_order(collection):
    features = extract_features(collection, keras.layers.GlobalAveragePooling2D(), image_size=40, progress=False)
    assert features.shape == (18, 3) and features.dtype == np.float32
    # 40x48 images resized to 40 and centre-cropped: the mean colour stays close to the full image's.
    np.testing.assert_allclose(features, mean_colours(collection), atol=3.0)


def test_cache_is_reused_and_keyed(collection, tmp_path):
    pool = keras.layers.GlobalAveragePooling2D()
    first = extract_features(collection, pool, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False)
    path = cache_path(str(tmp_path), collection, "mean", 32)
    meta = json.load(open(path[:-4] + ".json"))
    assert meta["count"] == 18 and meta["shape"] == [18, 3] and meta["model_key"] == "mean"

    def fail(*args, **kwargs):
        raise AssertionError("the model must not run on a cache hit")
    np.testing.assert_array_equal(
        extract_features(collection, fail, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False), first)
    # Another key (or image size) is another cache entry.
    other = extract_features(collection, pool, image_size=24, model_key="mean", cache_dir=str(tmp_path), progress=False)
    assert other.shape == (18, 3)
    with pytest.raises(ValueError, match="model_key is required"):
        extract_features(collection, pool, image_size=32, cache_dir=str(tmp_path))


def test_a_picture_replaced_under_the_same_name_is_extracted_again(image_dir, tmp_path):
    from PIL import Image

    pool = keras.layers.GlobalAveragePooling2D()
    before = image_folder(image_dir, progress=False)
    first = extract_features(before, pool, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False)
    Image.new("RGB", (40, 48), (250, 5, 5)).save(before.paths[3])
    after = image_folder(image_dir, progress=False)
    assert after.ids == before.ids
    again = extract_features(after, pool, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False)
    assert [name.endswith(".npy") for name in os.listdir(tmp_path)].count(True) == 1  # rebuilt: none left behind
    np.testing.assert_allclose(again[3], [250, 5, 5], atol=1e-3)
    np.testing.assert_allclose(np.delete(again, 3, axis=0), np.delete(first, 3, axis=0), atol=1e-5)


def test_file_names_that_are_not_utf8_and_empty_collections(image_dir, tmp_path):
    import shutil

    from tf_retrieval.errors import InvalidInputError

    folder = image_dir
    source = image_folder(folder, progress=False).paths[0]
    shutil.copy(source, os.path.join(os.path.dirname(source), os.fsdecode(b"caf\xe9.png")))  # a Latin-1 name
    collection = image_folder(folder, progress=False)
    assert any("\udce9" in image_id for image_id in collection.ids)
    features = extract_features(collection, keras.layers.GlobalAveragePooling2D(), image_size=32, model_key="mean",
                                cache_dir=str(tmp_path), progress=False)
    assert features.shape == (len(collection), 3)
    for cache_dir in (None, str(tmp_path)):  # the same error with and without a cache
        with pytest.raises(InvalidInputError, match="is empty: nothing to extract"):
            extract_features(collection.subset([]), keras.layers.GlobalAveragePooling2D(), image_size=32,
                             model_key="mean", cache_dir=cache_dir, progress=False)


def test_damaged_cache_is_rebuilt(collection, tmp_path, caplog):
    pool = keras.layers.GlobalAveragePooling2D()
    first = extract_features(collection, pool, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False)
    path = cache_path(str(tmp_path), collection, "mean", 32)
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00garbage")
    again = extract_features(collection, pool, image_size=32, model_key="mean", cache_dir=str(tmp_path), progress=False)
    np.testing.assert_allclose(again, first)
    assert "damaged or stale (checksum mismatch)" in caplog.text


def test_interrupted_extraction_resumes_from_shards(collection, tmp_path):
    pool = keras.layers.GlobalAveragePooling2D()
    calls = []

    def flaky(images, training=False):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return pool(images)

    with pytest.raises(RuntimeError, match="killed"):
        extract_features(collection, flaky, image_size=32, model_key="m", cache_dir=str(tmp_path), batch_size=4,
                         shard_size=4, progress=False)
    shards = os.path.join(cache_path(str(tmp_path), collection, "m", 32)[:-4] + ".partial")
    assert sorted(f for f in os.listdir(shards) if f.startswith("shard")) == ["shard_00000.npy", "shard_00001.npy"]

    seen = []

    def counting(images, training=False):
        seen.append(int(images.shape[0]))
        return pool(images)

    features = extract_features(collection, counting, image_size=32, model_key="m", cache_dir=str(tmp_path), batch_size=4,
                                shard_size=4, progress=False)
    assert sum(seen) <= 18 - 8  # the two finished shards were not recomputed
    np.testing.assert_allclose(features, extract_features(collection, pool, image_size=32, progress=False), atol=1e-5)
    assert not os.path.exists(shards)


def test_each_image_size_and_dtype_keeps_its_own_entry(collection, tmp_path):
    pool = keras.layers.GlobalAveragePooling2D()
    calls = []

    def counting(images, training=False):
        calls.append(int(images.shape[1]))
        return pool(images)

    for size, dtype in ((32, "float32"), (24, "float32"), (32, "float16"), (32, "float32"), (24, "float32")):
        features = extract_features(collection, counting, image_size=size, model_key="m", cache_dir=str(tmp_path),
                                    dtype=dtype, progress=False)
        assert features.dtype == dtype
    assert sorted(set(calls)) == [24, 32] and len(calls) == 3  # the last two were cache hits


def test_concurrent_extractions_of_one_key_take_turns(collection, tmp_path):
    import threading

    pool = keras.layers.GlobalAveragePooling2D()
    runs, results = [], []

    def counting(images, training=False):
        runs.append(1)
        return pool(images)

    def extract():
        results.append(extract_features(collection, counting, image_size=32, model_key="m", cache_dir=str(tmp_path),
                                        batch_size=6, shard_size=6, progress=False))

    threads = [threading.Thread(target=extract) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 3 and len(results) == 2  # one extraction (3 batches); the other waited and read the cache
    np.testing.assert_array_equal(results[0], results[1])


def test_an_empty_shard_file_is_extracted_again(collection, tmp_path):
    pool = keras.layers.GlobalAveragePooling2D()
    shards = cache_path(str(tmp_path), collection, "m", 32)[:-4] + ".partial"
    with pytest.raises(RuntimeError, match="stop"):
        def stop(images, training=False):
            raise RuntimeError("stop")
        extract_features(collection, stop, image_size=32, model_key="m", cache_dir=str(tmp_path), progress=False)
    open(os.path.join(shards, "shard_00000.npy"), "wb").close()  # a crash left it empty
    features = extract_features(collection, pool, image_size=32, model_key="m", cache_dir=str(tmp_path),
                                progress=False)
    assert features.shape == (18, 3)
