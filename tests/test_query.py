"""Query-time logic (`search.query`): Rocchio feedback, class filters, and the multi-model `Searcher`.

The engines are small and transparent: images of 3 colour classes, embedded by their mean colour ("colour") or by the
mean colour reversed ("reversed"), in exact indexes; expected rankings are recomputed with numpy. (α-QE is tested with
the engine, in test_engine.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.search.query import Query, Searcher, class_labels, rocchio


class ColourEmbedder:
    """The mean colour of an image (optionally with its channels reversed), L2-normalised."""

    def __init__(self, reverse: bool = False):
        self.reverse = reverse

    def embed_bytes(self, encoded):
        from tf_retrieval.data.images import decode_image

        vectors = np.stack([decode_image(b).reshape(-1, 3).mean(axis=0) for b in encoded]).astype(np.float32)
        vectors = vectors[:, ::-1] * [1.0, 0.5, 0.25] if self.reverse else vectors
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def colour_engine(collection, name: str, reverse: bool = False):
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.search.engine import RetrievalEngine
    from tf_retrieval.search.index import build_index

    embedder = ColourEmbedder(reverse)
    vectors = embedder.embed_bytes([collection.read_bytes(i) for i in range(len(collection))])
    config = ModelConfig(name=name, backbone="mobilenet_v2", image_size=32, weights=None)
    return RetrievalEngine(config, collection, build_index(vectors, metric="cosine", backend="exact"), embedder)


@pytest.fixture
def collection(image_dir):
    from tf_retrieval.data.images import image_folder

    return image_folder(image_dir, progress=False)


@pytest.fixture
def searcher(collection):
    return Searcher({"colour": colour_engine(collection, "colour"),
                     "reversed": colour_engine(collection, "reversed", reverse=True)})


def ranking(engine, query: np.ndarray, exclude=()) -> list[str]:
    """Ids of the database images by cosine similarity to `query`, best first (the numpy ground truth)."""
    vectors = engine.vectors(np.arange(len(engine)))
    scores = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    return [engine.collection.ids[i] for i in np.argsort(-scores, kind="stable") if i not in set(exclude)]


# ------------------------------------------------------------------------------------------------- rocchio

def test_rocchio_formula_and_errors():
    q = np.array([1.0, 0.0, 0.0], np.float32)
    positives = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    moved = rocchio(q, positives, alpha=1.0, beta=0.75)
    expected = np.array([1.0, 0.375, 0.375]) / np.linalg.norm([1.0, 0.375, 0.375])
    np.testing.assert_allclose(moved, expected, rtol=1e-6)
    np.testing.assert_allclose(rocchio(None, positives), np.array([0, 1, 1]) / np.sqrt(2), rtol=1e-6)
    with pytest.raises(ValueError, match="positives of shape"):
        rocchio(q, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="dimension 3 but positives have 2"):
        rocchio(q, np.ones((1, 2)))
    with pytest.raises(ValueError, match="zero"):
        rocchio(q, -q[None, :], alpha=1.0, beta=1.0)


def test_rocchio_refuses_binary_codes():
    codes = np.packbits(np.eye(16, dtype=bool)[:3], axis=1)  # what a hashing model's engine stores: uint8 [m, 2]
    with pytest.raises(InvalidInputError, match="float embeddings, but this model's vectors are uint8 binary hash"):
        rocchio(codes[0], codes[1:])


def test_rocchio_on_a_hashing_engine_says_why_not(collection):
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.search.engine import RetrievalEngine
    from tf_retrieval.search.index import build_index
    from tf_retrieval.vectors import pack_codes

    codes = pack_codes(np.random.default_rng(0).normal(size=(len(collection), 16)))
    config = ModelConfig(name="hash", backbone="mobilenet_v2", image_size=32, weights=None, hash_bits=16)
    index = build_index(codes, metric="hamming", backend="exact", dim=16)
    searcher = Searcher({"hash": RetrievalEngine(config, collection, index)})
    with pytest.raises(InvalidInputError, match="binary hash codes"):
        searcher.search(Query(id=collection.ids[0], positives=[collection.ids[1]]))


# ------------------------------------------------------------------------------------------------- class filters

def test_class_labels_accept_names_labels_and_comma_lists():
    names = ["blue", "green", "red"]
    assert class_labels(names, None) is None and class_labels(names, []) is None and class_labels(names, "") is None
    assert class_labels(names, ["red", "blue"]) == [0, 2]
    assert class_labels(names, "red, 1") == [1, 2]
    assert class_labels(names, [2, np.int64(2), "2"]) == [2]
    assert class_labels(["red, dark", "blue"], "red, dark") == [0]  # a class name with a comma is one name
    for bad in (["purple"], [3], ["3"], [True], [-1], ["²"]):  # "²".isdigit(), but no int
        with pytest.raises(InvalidInputError, match="unknown class .* known classes: blue, green, red"):
            class_labels(names, bad)


# ------------------------------------------------------------------------------------------------- queries

def test_query_needs_something_to_search_for():
    with pytest.raises(InvalidInputError, match="no query"):
        Query()
    with pytest.raises(InvalidInputError, match="Query.from_bytes"):
        Query(encoded=b"png bytes")
    from tf_retrieval.data.images import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="upload.png"):
        Query.from_bytes(b"not an image", name="upload.png")


def test_search_by_image_by_id_and_by_favourites(searcher, collection):
    engine = searcher.engines["colour"]
    red = collection.ids.index("red/red_002.png")
    by_image = searcher.search(Query.from_bytes(collection.read_bytes(red)), k=4)
    assert by_image.model == "colour" and by_image.total == 4 and by_image.classes is None
    assert by_image.results[0].id == "red/red_002.png" and set(by_image.timing_ms) == {"embed_ms", "search_ms"}
    assert [r.id for r in by_image.results] == ranking(engine, engine.vectors([red])[0])[:4]

    by_id = searcher.search(Query(id="red/red_002.png"), k=17)  # every other image: the query image is left out
    assert [r.id for r in by_id.results] == ranking(engine, engine.vectors([red])[0], exclude={red})

    favourites = ["blue/blue_000.png", "blue/blue_001.png"]
    positions = [collection.ids.index(f) for f in favourites]
    moved = searcher.search(Query(id="red/red_002.png", positives=favourites, alpha=0.5, beta=1.0), k=15)
    expected = rocchio(engine.vectors([red])[0], engine.vectors(positions), 0.5, 1.0)
    assert [r.id for r in moved.results] == ranking(engine, expected, exclude={red, *positions})
    alone = searcher.search(Query(positives=favourites), k=3)
    assert [r.class_name for r in alone.results] == ["blue"] * 3 and not set(favourites) & {r.id for r in alone.results}


def test_filters_and_side_by_side(searcher, collection):
    answer = searcher.search(Query(id="red/red_000.png"), "reversed", k=18, classes="green,blue", threshold=-1.0)
    assert answer.model == "reversed" and answer.classes == ["blue", "green"] and answer.total == 12
    assert {r.class_name for r in answer.results} == {"blue", "green"}
    assert searcher.search(Query(id="red/red_000.png"), k=18, threshold=1.01).total == 0

    answers = searcher.compare(Query.from_bytes(collection.read_bytes(3)), k=5, classes=["blue"])
    assert list(answers) == ["colour", "reversed"]
    for name, answer in answers.items():
        engine = searcher.engines[name]
        vector = engine.embed([collection.read_bytes(3)])[0]
        blue = [i for i in ranking(engine, vector) if i.startswith("blue/")]
        assert [r.id for r in answer.results] == blue[:5]
    assert [r.score for r in answers["colour"].results] != [r.score for r in answers["reversed"].results]


def test_bundles_over_different_images_and_classes_side_by_side(collection):
    """A model asked about an image only another model's collection holds embeds its pixels; a class filter keeps,
    for each model, the classes it knows."""
    import dataclasses

    reds_and_greens = [i for i, label in enumerate(collection.labels) if collection.class_names[label] != "blue"]
    part = collection.subset(reds_and_greens)
    part = dataclasses.replace(part, class_names=["green", "red"], labels=part.labels - 1)  # blue was label 0
    searcher = Searcher({"colour": colour_engine(collection, "colour"), "part": colour_engine(part, "part")})
    engine = searcher.engines["part"]
    blue = "blue/blue_001.png"
    pixels = engine.embed([collection.read_bytes(collection.ids.index(blue))])[0]

    answer = searcher.search(Query(id=blue), "part", k=12)
    assert [r.id for r in answer.results] == ranking(engine, pixels) and "embed_ms" in answer.timing_ms
    red = part.ids.index("red/red_000.png")
    feedback = searcher.search(Query(id="red/red_000.png", positives=[blue], alpha=0.3, beta=1.0), "part", k=11)
    expected = rocchio(engine.vectors([red])[0], pixels[None], 0.3, 1.0)
    assert [r.id for r in feedback.results] == ranking(engine, expected, exclude={red})
    assert set(searcher.compare(Query(id=blue), k=3)) == {"colour", "part"}

    answers = searcher.compare(Query(id="red/red_000.png"), k=20, classes=["blue", "red"])
    assert {r.class_name for r in answers["colour"].results} == {"blue", "red"} and answers["colour"].total == 11
    assert {r.class_name for r in answers["part"].results} == {"red"} and answers["part"].classes == ["red"]
    only_blue = searcher.compare(Query(id="red/red_000.png"), k=5, classes="blue")
    assert only_blue["part"].total == 0 and only_blue["part"].classes == [] and only_blue["colour"].total == 5
    with pytest.raises(InvalidInputError, match="unknown class 'purple' in classes; known classes: blue, green, red"):
        searcher.compare(Query(id="red/red_000.png"), classes=["red", "purple"])
    with pytest.raises(MissingError, match="unknown image id 'ghost.png': no collection holds it"):
        searcher.search(Query(id="ghost.png"), "part")


def test_random_ids_locate_and_errors(searcher, collection):
    assert searcher.random_id(seed=3) == searcher.random_id(seed=3) and searcher.random_id() in collection.ids
    assert len({searcher.random_id() for _ in range(20)}) > 1
    assert searcher.locate("green/green_001.png") == ("colour", collection.ids.index("green/green_001.png"))
    assert searcher.locate("green/green_001.png", "reversed")[0] == "reversed"
    assert searcher.engine() == ("colour", searcher.engines["colour"])
    with pytest.raises(MissingError, match="unknown image id 'nope.png'"):
        searcher.locate("nope.png")
    with pytest.raises(MissingError, match="unknown model 'resnet'; available models: colour, reversed"):
        searcher.search(Query(id="red/red_000.png"), "resnet")
    with pytest.raises(MissingError, match="unknown image id 'ghost.png': no collection holds it"):
        searcher.search(Query(id="red/red_000.png", positives=["ghost.png"]))
    with pytest.raises(InvalidInputError, match="id must be a database image id"):
        searcher.search(Query(id=42))
    with pytest.raises(InvalidInputError, match="unknown class 'purple'"):
        searcher.search(Query(id="red/red_000.png"), classes=["purple"])
    with pytest.raises(InvalidInputError, match="at least one engine"):
        Searcher({})
    emptied = colour_engine(collection, "emptied")
    emptied.collection = collection.subset([])  # as `tfr index --delete` of every image leaves a bundle
    with pytest.raises(MissingError, match="the collection of model 'emptied' is empty"):
        Searcher({"emptied": emptied}).random_id()
    with pytest.raises(InvalidInputError, match="default_model 'nope'"):
        Searcher(searcher.engines, default_model="nope")


def test_a_custom_embed_function_embeds_query_images(searcher, collection):
    calls = []

    def embed(model, engine, query):
        calls.append((model, query.image.shape))
        return engine.embed([query.encoded])[0]

    custom = Searcher(searcher.engines, "reversed", embed=embed)
    answer = custom.search(Query.from_bytes(collection.read_bytes(0)), k=2)
    assert answer.model == "reversed" and calls == [("reversed", (40, 48, 3))]
