import json
import os

import numpy as np
import pytest

from tf_retrieval.config import ModelConfig
from tf_retrieval.data import ImageDecodeError, image_folder
from tf_retrieval.engine import RetrievalEngine, build_bundle
from tf_retrieval.index import IndexModelMismatchError


class ColourEmbedder:
    """A transparent embedder for tests: the mean colour of the image, L2-normalised."""

    def embed_bytes(self, encoded):
        from tf_retrieval.data import decode_image

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
    neighbours = engine.search_position(0, k=5)
    assert 0 not in [r.position for r in neighbours] and {r.class_name for r in neighbours} == {"blue"}
    with pytest.raises(IndexError, match="no image at position 99"):
        engine.search_position(99)
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


def test_bundle_detects_a_changed_collection(bundle, image_dir):
    path, _, embedder = bundle
    os.remove(os.path.join(image_dir, "red", "red_000.png"))
    with pytest.raises(ValueError, match="the collection changed since the index was built"):
        RetrievalEngine.load(path, embedder=embedder)
    with open(os.path.join(path, "catalog.json")) as f:
        assert len(json.load(f)["ids"]) == 18


def test_alpha_query_expansion_by_hand():
    from tf_retrieval.expansion import alpha_query_expansion, expand_exact

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
    from tf_retrieval.expansion import alpha_query_expansion

    _, engine, _ = bundle
    query = engine.vectors([0]) * 0.5 + engine.vectors([6]) * 0.5  # between two classes
    expanded = engine.search(query, k=18, expand=2, alpha=1.0)[0]
    top = engine.search(query, k=2)[0]
    moved = alpha_query_expansion(query, engine.vectors([r.position for r in top])[None], np.array([[r.score for r in top]]),
                                  alpha=1.0)
    assert [r.position for r in expanded] == [r.position for r in engine.search(moved, k=18)[0]]
