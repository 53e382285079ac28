import json
import os
import shutil

import numpy as np
import pytest

from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import ImageDecodeError, image_folder
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.search.engine import RetrievalEngine, build_bundle
from tf_retrieval.search.index import IndexModelMismatchError


class ColourEmbedder:
    """A transparent embedder for tests: the mean colour of the image, L2-normalised."""

    def embed_bytes(self, encoded):
        from tf_retrieval.data.images import decode_image

        vectors = np.stack([decode_image(b).reshape(-1, 3).mean(axis=0) for b in encoded]).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def bundle(image_dir, tmp_path):
    collection = image_folder(image_dir, progress=False)
    embedder = ColourEmbedder()
    vectors = embedder.embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None)
    path = str(tmp_path / "bundle")
    engine = build_bundle(path, config, collection, vectors, source=image_dir, backend="exact")
    return path, engine, embedder


def test_search_by_image_finds_its_class(bundle):
    _, engine, embedder = bundle
    engine._embedder = embedder
    query = engine.collection.read_bytes(0)  # a blue image
    results = engine.search_images([query], k=6)[0]
    assert [r.class_name for r in results] == ["blue"] * 6
    assert results[0].position == 0 and results[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))


def test_filters(bundle):
    _, engine, embedder = bundle
    engine._embedder = embedder
    blue = engine.vectors([0])
    red_label = engine.collection.class_names.index("red")
    only_red = engine.search(blue, k=3, classes=[red_label])[0]
    assert [r.class_name for r in only_red] == ["red"] * 3
    assert len(engine.search(blue, k=50)[0]) == 18
    close = engine.search(blue, k=50, threshold=0.99)[0]
    assert 1 <= len(close) <= 6 and all(r.score >= 0.99 for r in close)
    from tf_retrieval.errors import MissingError
    from tf_retrieval.search.query import Query, Searcher

    searcher = Searcher({"colour": engine})
    neighbours = searcher.search(Query(id=engine.collection.ids[0]), k=5).results  # a database image: itself left out
    assert 0 not in [r.position for r in neighbours] and {r.class_name for r in neighbours} == {"blue"}
    with pytest.raises(MissingError, match="unknown image id 'nope.png'"):
        searcher.search(Query(id="nope.png"))
    with pytest.raises(ImageDecodeError, match="not an image"):
        engine.search_images([b"garbage"])


def test_bundle_round_trip(bundle):
    path, engine, embedder = bundle
    engine._embedder = embedder
    loaded = RetrievalEngine.load(path, embedder=embedder)
    assert loaded.collection.ids == engine.collection.ids and len(loaded) == 18
    query = engine.collection.read_bytes(7)
    assert [r.id for r in loaded.search_images([query], 5)[0]] == [r.id for r in engine.search_images([query], 5)[0]]


def test_bundle_refuses_another_model_version(bundle):
    path, _, _ = bundle
    config = ModelConfig.load(os.path.join(path, "model.json"))
    config.version = 2
    config.save(os.path.join(path, "model.json"))
    with pytest.raises(IndexModelMismatchError, match="colour:v1"):
        RetrievalEngine.load(path)


def test_bundle_refuses_a_model_file_rewritten_in_place(image_dir, tmp_path):
    head = tmp_path / "my-head.keras"
    head.write_bytes(b"the head the index was built with")
    collection = image_folder(image_dir, progress=False)
    embedder = ColourEmbedder()
    vectors = embedder.embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None, head=str(head))
    build_bundle(str(tmp_path / "bundle"), config, collection, vectors, source=image_dir, backend="exact")
    assert len(RetrievalEngine.load(str(tmp_path / "bundle"), embedder=embedder)) == 18
    head.write_bytes(b"another head under the same name")
    with pytest.raises(IndexModelMismatchError, match=r"my-head.keras@[0-9a-f]{8}"):
        RetrievalEngine.load(str(tmp_path / "bundle"), embedder=embedder)


def test_bundle_detects_a_changed_collection(bundle, image_dir):
    path, _, embedder = bundle
    os.remove(os.path.join(image_dir, "red", "red_000.png"))
    with pytest.raises(ValueError, match="the collection changed since the index was built"):
        RetrievalEngine.load(path, embedder=embedder)
    with open(os.path.join(path, "catalog.json")) as f:
        assert len(json.load(f)["ids"]) == 18


def test_a_folder_bundle_loads_without_decoding_its_images_and_survives_one_damaged(bundle, image_dir, monkeypatch):
    import tf_retrieval.data.images as images

    path, _, embedder = bundle
    with open(os.path.join(image_dir, "red", "red_000.png"), "r+b") as f:
        f.truncate(100)  # damaged after it was indexed
    decoded = []
    monkeypatch.setattr(images, "decode_image", lambda data, **kwargs: decoded.append(1))
    engine = RetrievalEngine.load(path, embedder=embedder)
    assert decoded == [] and len(engine.collection) == 18  # loaded by listing the folder
    monkeypatch.undo()
    position = engine.collection.ids.index("red/red_000.png")
    with pytest.raises(ImageDecodeError, match="red/red_000.png: truncated or damaged"):
        engine.collection.image(position)  # the damage shows where the image is read
    assert engine.collection.image(position + 1).shape[2] == 3


@pytest.mark.parametrize("content, message", [('{"source": "x", "ids": [', "is damaged \\(Expecting value"),
                                              ('{"source": "x"}', "is damaged \\(it lacks ids, labels, class_names\\)"),
                                              ("[]", "is damaged \\(it lacks source, ids, labels, class_names\\)")])
def test_a_damaged_catalog_is_a_clear_error(tmp_path, bundle, content, message):
    from tf_retrieval.search.engine import delete_images

    damaged = str(tmp_path / "damaged")
    shutil.copytree(bundle[0], damaged)
    with open(os.path.join(damaged, "catalog.json"), "w") as f:
        f.write(content)
    for call in (lambda: RetrievalEngine.load(damaged, embedder=bundle[2]), lambda: delete_images(damaged, ["x"])):
        with pytest.raises(InvalidInputError, match=f"catalog.json {message}.*rebuild the bundle with `tfr index`"):
            call()


def test_alpha_query_expansion_by_hand():
    from tf_retrieval.search.query import alpha_query_expansion, expand_exact

    query = np.array([[1.0, 0.0]])
    neighbours = np.array([[[0.0, 1.0], [0.6, 0.8]]])
    # alpha = 1: q + 0.5 * n1 + 0.8 * n2 = [1.48, 1.14], normalised
    expanded = alpha_query_expansion(query, neighbours, np.array([[0.5, 0.8]]), alpha=1.0)
    np.testing.assert_allclose(expanded, [[1.48, 1.14]] / np.hypot(1.48, 1.14), rtol=1e-6)
    # alpha = 0 is average query expansion; padding (-inf) and negative similarities add nothing
    np.testing.assert_allclose(alpha_query_expansion(query, neighbours, np.array([[0.5, -np.inf]]), alpha=0.0),
                               [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(query, neighbours, np.array([[-0.5, -0.2]]), 2.0), query)
    with pytest.raises(ValueError, match="shapes do not match"):
        alpha_query_expansion(query, neighbours, np.array([[0.5]]))
    database = np.array([[1.0, 0.1], [1.0, 0.3], [0.0, 1.0]])
    np.testing.assert_allclose(expand_exact(query, database, k=1, alpha=0.0),
                               alpha_query_expansion(query, database[None, :1] / np.linalg.norm(database[0]),
                                                     np.array([[1.0]]), 0.0), rtol=1e-6)


def test_search_with_query_expansion_moves_the_query_to_its_neighbours(bundle):
    from tf_retrieval.search.query import alpha_query_expansion

    _, engine, _ = bundle
    query = engine.vectors([0]) * 0.5 + engine.vectors([6]) * 0.5  # between two classes
    expanded = engine.search(query, k=18, expand=2, alpha=1.0)[0]
    top = engine.search(query, k=2)[0]
    moved = alpha_query_expansion(query, engine.vectors([r.position for r in top])[None], np.array([[r.score for r in top]]),
                                  alpha=1.0)
    assert [r.position for r in expanded] == [r.position for r in engine.search(moved, k=18)[0]]


def dba_reference(vectors, k, alpha):
    """α-DBA by brute force: each unit vector plus its k most similar others (ties: earlier first), weighted."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    out = []
    for i, u in enumerate(unit):
        others = [j for j in range(len(unit)) if j != i]
        similar = sorted(others, key=lambda j: (-float(unit[j] @ u), j))[:k]
        v = u + sum(max(float(unit[j] @ u), 0.0) ** alpha * unit[j] for j in similar)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_database_augmentation_against_brute_force(rng):
    from tf_retrieval.search.query import augment_database

    vectors = rng.normal(size=(30, 5)).astype(np.float32)
    vectors[7] = vectors[3] * 2  # a duplicate (same direction): its own entry, not its twin's, is left out
    for k, alpha in ((1, 3.0), (4, 1.0), (29, 0.0)):
        np.testing.assert_allclose(augment_database(vectors, k, alpha), dba_reference(vectors, k, alpha), atol=1e-5)
    np.testing.assert_allclose(augment_database(vectors, 100, 3.0), augment_database(vectors, 29, 3.0), atol=1e-6)
    np.testing.assert_allclose(augment_database(vectors[:1], 5), vectors[:1] / np.linalg.norm(vectors[0]), atol=1e-6)
    with pytest.raises(ValueError, match="binary codes cannot be augmented"):
        augment_database(np.zeros((4, 6), np.uint8), 2)
    with pytest.raises(ValueError, match="needs k >= 1"):
        augment_database(vectors, 0)


def test_a_bundle_with_database_augmentation(image_dir, tmp_path):
    from conftest import make_image_folder

    from tf_retrieval.search.engine import add_images
    from tf_retrieval.search.query import augment_database, expand_with_index

    collection = image_folder(image_dir, progress=False)
    embedder = ColourEmbedder()
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None)
    path = str(tmp_path / "bundle")
    vectors = embed_all(embedder, collection)
    engine = build_bundle(path, config, collection, vectors, source=image_dir, backend="exact", augment=2, alpha=1.0)
    np.testing.assert_allclose(engine.vectors(np.arange(18)), augment_database(vectors, 2, 1.0), atol=1e-6)
    with open(os.path.join(path, "catalog.json")) as f:
        assert json.load(f)["database_augmentation"] == {"k": 2, "alpha": 1.0}
    # images added later are augmented over the images already indexed
    other = image_folder(make_image_folder(tmp_path / "more", classes=("red",), per_class=2, seed=1), progress=False)
    expected = expand_with_index(RetrievalEngine.load(path).index, embed_all(embedder, other), 2, 1.0)
    add_images(path, other, embed_all(embedder, other))
    engine = RetrievalEngine.load(path, embedder=embedder)
    np.testing.assert_allclose(engine.vectors([18, 19]), expected, atol=1e-6)
    assert engine.database_augmentation == {"k": 2, "alpha": 1.0}
    with pytest.raises(ValueError, match="needs k >= 0 and the cosine metric"):
        build_bundle(str(tmp_path / "b2"), config, collection, vectors, source=image_dir, metric="euclidean", augment=2)
    hashing = ModelConfig(name="codes", backbone="mobilenet_v2", image_size=32, weights=None, hash_bits=8)
    with pytest.raises(ValueError, match="needs k >= 0 and the cosine metric"):
        build_bundle(str(tmp_path / "b3"), hashing, collection, np.zeros((18, 1), np.uint8), source=image_dir,
                     augment=2)


def embed_all(embedder, collection):
    return embedder.embed_bytes([collection.read_bytes(i) for i in range(len(collection))])


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_add_and_delete_images_without_a_rebuild(backend, image_dir, tmp_path):
    from conftest import make_image_folder

    from tf_retrieval.search.engine import add_images, delete_images, pending_images
    from tf_retrieval.search.index import Index

    collection = image_folder(image_dir, progress=False)
    embedder = ColourEmbedder()
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None)
    path = str(tmp_path / "bundle")
    build_bundle(path, config, collection, embed_all(embedder, collection), source=image_dir, backend=backend)
    other = image_folder(make_image_folder(tmp_path / "more", classes=("yellow", "red"), per_class=3, seed=1),
                         progress=False)

    result = add_images(path, other, embed_all(embedder, other))
    root = os.path.realpath(str(tmp_path / "more"))
    assert result["count"] == 24 and result["added"][0] == os.path.join(root, "red", "red_000.png")
    engine = RetrievalEngine.load(path, embedder=embedder)
    assert len(engine) == 24 and engine.collection.class_names == ["blue", "green", "red", "yellow"]
    yellow = engine.collection.ids.index(os.path.join(root, "yellow", "yellow_001.png"))
    top = engine.search_images([engine.collection.read_bytes(yellow)], k=3)[0]
    assert top[0].position == yellow and [r.class_name for r in top] == ["yellow"] * 3
    assert sum(engine.collection.labels == 2) == 9  # the added red images joined the bundle's red class
    assert engine.index.backend == backend
    assert len(pending_images(path, other)) == 0 and add_images(path, other, embed_all(embedder, other))["added"] == []

    gone = [os.path.join("red", "red_000.png"), os.path.join(root, "yellow", "yellow_000.png")]
    assert delete_images(path, gone)["count"] == 22
    engine = RetrievalEngine.load(path, embedder=embedder)
    assert len(engine) == len(engine.collection) == 22 and not set(gone) & set(engine.collection.ids)
    # positions and index ids now differ: every image's stored vector is still its own
    np.testing.assert_allclose(engine.vectors(np.arange(22)), embed_all(embedder, engine.collection), atol=1e-6)
    for position in (0, 10, 21):
        assert engine.search(engine.vectors([position]), k=1)[0][0].position == position
    assert all(r.id not in gone for r in engine.search(engine.vectors([0]), k=22)[0])
    with pytest.raises(KeyError, match="not in the bundle"):
        delete_images(path, ["red/red_001.png", "no/such.png"])
    assert len(RetrievalEngine.load(path)) == 22  # nothing was deleted
    delete_images(path, [i for i in engine.collection.ids if i.startswith(root)])
    with open(os.path.join(path, "catalog.json")) as f:
        catalog = json.load(f)
    assert catalog["added_sources"] == [] and set(catalog["origins"]) == {0}  # the other folder is forgotten
    assert sorted(os.listdir(path)) == ["catalog.json", "index", "model.json"]
    assert Index.load(os.path.join(path, "index")).backend == backend


def test_bundle_update_is_atomic(bundle, image_dir, tmp_path, monkeypatch):
    from tf_retrieval import storage
    from tf_retrieval.search.engine import delete_images

    path, _, embedder = bundle
    with open(os.path.join(path, "catalog.json")) as f:
        before = f.read()

    def broken_replace(new, target):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "_replace_dir", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        delete_images(path, [os.path.join("red", "red_000.png")])
    with open(os.path.join(path, "catalog.json")) as f:
        assert f.read() == before
    assert len(RetrievalEngine.load(path, embedder=embedder)) == 18
    assert sorted(os.listdir(os.path.dirname(path))) == ["bundle", "images"]  # no temp folder left behind


def test_scann_bundle_update_uses_the_mutation_api(tmp_path):
    from conftest import make_image_folder

    from tf_retrieval.search.engine import add_images, delete_images

    base = image_folder(make_image_folder(tmp_path / "base", per_class=14), progress=False)  # 42 images
    embedder = ColourEmbedder()
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None)
    path = str(tmp_path / "bundle")
    build_bundle(path, config, base, embed_all(embedder, base), source=base.name, backend="scann")
    more = image_folder(make_image_folder(tmp_path / "more", classes=("grey",), per_class=4), progress=False)
    add_images(path, more, embed_all(embedder, more))
    delete_images(path, [base.ids[0], base.ids[20]])
    engine = RetrievalEngine.load(path, embedder=embedder)
    assert engine.index._built["mutations"] == 6 and engine.index._built["size"] == 42  # 6 / 42 < 25%: no retraining
    grey = engine.collection.ids.index(os.path.join(os.path.realpath(more.name), "grey", "grey_002.png"))
    assert engine.search(engine.vectors([grey]), k=1)[0][0].position == grey


def test_a_tfds_bundle_loads_its_images_from_its_store_until_the_catalog_changes(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from tf_retrieval.data.images import PackedImages, load_tfds
    from tf_retrieval.search import engine as engine_module
    from tf_retrieval.search.engine import delete_images

    with tfds.testing.mock_data(num_examples=12):
        collection = load_tfds("cifar10", splits=["train"])
    vectors = ColourEmbedder().embed_bytes(list(collection.encoded))
    config = ModelConfig(name="colour", backbone="mobilenet_v2", image_size=32, weights=None)
    path = str(tmp_path / "bundle")
    build_bundle(path, config, collection, vectors, source="cifar10", backend="exact")
    reads = []

    def counting_load_tfds(*args, **kwargs):
        reads.append(kwargs.get("splits"))
        with tfds.testing.mock_data(num_examples=12):
            return load_tfds(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_tfds", counting_load_tfds)
    first = RetrievalEngine.load(path)  # reads the source once, then packs its images into the bundle
    assert reads == [["train"]] and os.path.isfile(os.path.join(path, "images", "data.npy"))
    second = RetrievalEngine.load(path)
    assert reads == [["train"]] and isinstance(second.collection.encoded, PackedImages)
    assert [second.collection.read_bytes(i) for i in range(12)] == list(collection.encoded)
    assert second.collection.ids == first.collection.ids and list(second.collection.splits) == ["train"] * 12
    np.testing.assert_array_equal(second.collection.labels, collection.labels)

    delete_images(path, [collection.ids[0]])  # a new catalog: the old store no longer describes it
    assert not os.path.exists(os.path.join(path, "images"))
    third = RetrievalEngine.load(path)
    assert len(reads) == 2 and third.collection.ids == collection.ids[1:]
    assert third.collection.read_bytes(0) == collection.encoded[1]
    with open(os.path.join(path, "images", "manifest.json"), "w") as f:
        f.write("{broken")
    assert RetrievalEngine.load(path).collection.ids == collection.ids[1:] and len(reads) == 3  # rebuilt, not fatal
