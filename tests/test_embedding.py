"""One path from a model config to vectors (`features.embedding`), and every metric right from end to end: an index
built by the engine, the CLI and the web API returns the query image itself first, with the metric's score."""
import io
import os

import numpy as np
import pytest

from tf_retrieval.cli import main
from tf_retrieval.config import ModelConfig
from tf_retrieval.data.images import image_folder, resize_and_crop_images
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.features.embedding import Embedder, build_model, embed_collection, head_function
from tf_retrieval.search.engine import RetrievalEngine, index_collection
from tf_retrieval.vectors import finish, pack_codes

SMALL = dict(backbone="mobilenet_v2", image_size=32, weights=None)
SMALL_FLAGS = ["--backbone", "mobilenet_v2", "--image-size", "32", "--weights", "none"]
#: The score of an image against itself, by metric: similarities, or minus a distance.
SELF_SCORE = {"cosine": 1.0, "dot": 1.0, "pearson": 1.0, "euclidean": 0.0, "hamming": 0.0}
QUERY = os.path.join("green", "green_002.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"), classes=("red", "green", "blue", "yellow"), per_class=5)


@pytest.fixture(scope="module")
def hash_model(folder, tmp_path_factory):
    """A 64-bit hashing model: the ImageNet EfficientNet-Lite0 (shipped in a PyPI package) and a hashing head saved as a
    `.keras` file, whose codes are the signs of random projections of the features centred on the collection's mean
    (a random backbone's features are nearly identical for these images, and would share codes)."""
    from tf_retrieval.features.embedding import backbone_features
    from tf_retrieval.models.heads import build_head

    work = tmp_path_factory.mktemp("head")
    backbone = dict(backbone="efficientnet_lite0", image_size=32, weights="imagenet")
    features = backbone_features(image_folder(folder, progress=False), ModelConfig(**backbone), workdir=str(work),
                                 progress=False)
    head = build_head(1280, hash_bits=64, hidden_dim=0)
    projection = np.random.default_rng(0).normal(size=(1280, 64)).astype(np.float32)
    head.get_layer("codes").set_weights([projection, -features.mean(axis=0) @ projection])
    path = str(work / "hash-head.keras")
    head.save(path)
    return ModelConfig(name="hash", head=path, hash_bits=64, **backbone)


def model_for(metric, hash_model):
    return hash_model if metric == "hamming" else ModelConfig(name="small", **SMALL)


def test_finish_normalises_floats_and_packs_codes():
    vectors = finish(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(vectors, [[0.6, 0.8], [0.0, 0.0]])
    assert vectors.dtype == np.float32
    codes = finish(np.array([[0.5, -0.1] * 8]), hash_bits=16)
    assert codes.dtype == np.uint8 and codes.tolist() == [[0b10101010, 0b10101010]]
    assert finish(codes, hash_bits=16) is codes  # packed codes pass unchanged
    with pytest.raises(InvalidInputError, match=r"must output \[n, 16\] codes"):
        finish(np.zeros((1, 8)), hash_bits=16)
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        finish(np.array([[np.nan, 1.0]]))


def test_every_consumer_gets_the_same_vectors(folder, hash_model, tmp_path):
    """Collection embedding (cached features + head), in-process embedding of bytes, and the keras model agree."""
    collection = image_folder(folder, progress=False)
    encoded = [collection.read_bytes(i) for i in range(3)]
    for config in (ModelConfig(name="small", **SMALL), hash_model):
        whole = embed_collection(collection, config, workdir=str(tmp_path), progress=False)[:3]
        one_by_one = Embedder(config).embed_bytes(encoded)
        if config.hash_bits:
            assert whole.dtype == one_by_one.dtype == np.uint8 and whole.shape == (3, 8)  # 64 bits in 8 bytes
            np.testing.assert_array_equal(whole, one_by_one)
        else:
            assert whole.dtype == np.float32 and whole.shape == (3, 1280)
            np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
    served = build_model(hash_model)  # what the SavedModel serves: +-1 codes that pack to the index's codes
    pixels = Embedder(hash_model).model.input_shape[1:]
    x = np.random.default_rng(0).uniform(0, 255, (2, *pixels)).astype(np.float32)
    signs = np.asarray(served(x))
    assert set(np.unique(signs).tolist()) <= {-1.0, 1.0}
    np.testing.assert_array_equal(pack_codes(signs), Embedder(hash_model).embed_pixels(x))
    features = np.random.default_rng(1).normal(size=(4, 1280)).astype(np.float32)
    assert head_function(hash_model)(features).shape == (4, 8)


def test_flip_pools_an_image_with_its_mirror(folder, hash_model, tmp_path):
    """flip=True: the backbone's features are the mean of the image's and its mirror's, so an image and its mirror get
    the same vector from every consumer; the model id and the feature cache are its own."""
    import dataclasses

    from tf_retrieval.cli import _model_config, build_parser
    from tf_retrieval.data.images import resize_and_crop_images
    from tf_retrieval.models.backbones import backbone_of

    collection = image_folder(folder, progress=False)
    plain = ModelConfig(name="lite", backbone="efficientnet_lite0", image_size=32, weights="imagenet")
    flipped = dataclasses.replace(plain, flip=True)
    assert flipped.model_id() == "lite:v1:efficientnet_lite0-32px-flip-tfinputs-avg-imagenet:identity"
    assert plain.model_id() == "lite:v1:efficientnet_lite0-32px-tfinputs-avg-imagenet:identity"  # unchanged without flip
    pixels = resize_and_crop_images([collection.image(i) for i in range(3)], 32)
    mirrored = np.ascontiguousarray(pixels[:, :, ::-1])
    trunk = backbone_of(plain)
    mean = (np.asarray(trunk(pixels)) + np.asarray(trunk(mirrored))) / 2
    np.testing.assert_allclose(np.asarray(backbone_of(flipped)(pixels)), mean, rtol=1e-4, atol=1e-5)
    whole = embed_collection(collection, flipped, workdir=str(tmp_path), progress=False)[:3]
    np.testing.assert_allclose(whole, finish(mean), atol=1e-4)
    assert any("flip" in name for name in os.listdir(tmp_path / "features"))
    assert not np.allclose(whole, embed_collection(collection, plain, workdir=str(tmp_path), progress=False)[:3],
                           atol=1e-3)
    embedder = Embedder(flipped, workdir=str(tmp_path))
    assert embedder.runtime == "litert"
    np.testing.assert_allclose(embedder.embed_pixels(mirrored), embedder.embed_pixels(pixels), atol=1e-5)
    hashing = Embedder(dataclasses.replace(hash_model, flip=True), workdir=str(tmp_path))
    np.testing.assert_array_equal(hashing.embed_pixels(mirrored), hashing.embed_pixels(pixels))
    unflipped = Embedder(hash_model, workdir=str(tmp_path))  # the control: without flip the codes differ
    assert (unflipped.embed_pixels(mirrored) != unflipped.embed_pixels(pixels)).any()
    flags = ["index", "--model-config", str(tmp_path / "m.json")]
    flipped.save(str(tmp_path / "m.json"))
    assert _model_config(build_parser().parse_args(flags)).flip
    assert not _model_config(build_parser().parse_args([*flags, "--no-flip"])).flip
    with pytest.raises(InvalidInputError, match="flip must be true or false"):
        ModelConfig(flip="yes")


def test_feature_caches_are_computed_in_either_runtime_and_kept_apart(folder, tmp_path, monkeypatch):
    from tf_retrieval.features import embedding, litert

    collection = image_folder(folder, progress=False)
    config = ModelConfig(name="lite", backbone="efficientnet_lite0", image_size=32, weights="imagenet")
    work = str(tmp_path)
    fast = embedding.backbone_features(collection, config, workdir=work, progress=False)  # LiteRT by default
    slow = embedding.backbone_features(collection, config, workdir=work, progress=False, runtime="tf")
    assert fast.shape == slow.shape == (len(collection), 1280)
    np.testing.assert_allclose(fast, slow, atol=1e-4 * np.abs(slow).max())
    caches = sorted(name for name in os.listdir(os.path.join(work, "features")) if name.endswith(".npy"))
    assert len(caches) == 2 and ("-litert-" in caches[0]) != ("-litert-" in caches[1])
    assert len(os.listdir(os.path.join(work, "litert"))) == 1  # the converted backbone, cached

    def no_model(*args, **kwargs):
        raise AssertionError("the cached features should have been read")

    monkeypatch.setattr(litert, "LiteRTModel", lambda flatbuffer: no_model)
    again = embedding.backbone_features(collection, config, workdir=work, progress=False)
    np.testing.assert_array_equal(again, fast)


def test_feature_caches_of_a_weights_file_follow_its_content(folder, tmp_path):
    from tf_retrieval.features import embedding
    from tf_retrieval.models.backbones import backbone_of
    from tf_retrieval.models.heads import trunk_of

    collection = image_folder(folder, progress=False)
    random_config = ModelConfig(name="m", backbone="mobilenet_v2", image_size=32, weights=None)
    paths = [str(tmp_path / f"{run}" / "trunk.weights.h5") for run in ("a", "b")]  # one base name, two contents
    for seed, path in enumerate(paths):
        os.makedirs(os.path.dirname(path))
        trunk = trunk_of(backbone_of(random_config))  # seeded: the same weights each time, so perturb them
        noise = np.random.default_rng(seed)
        trunk.set_weights([w + noise.normal(0, 0.1, w.shape).astype(w.dtype) for w in trunk.get_weights()])
        trunk.save_weights(path)
    features = [embedding.backbone_features(collection, ModelConfig(name="m", backbone="mobilenet_v2", image_size=32,
                                                                    weights=path),
                                            workdir=str(tmp_path / "work"), progress=False, runtime="tf")
                for path in paths]
    direct = backbone_of(ModelConfig(name="m", backbone="mobilenet_v2", image_size=32, weights=paths[1]))
    expected = direct.predict(resize_and_crop_images([collection.image(0)], 32), verbose=0)
    scale = np.abs(expected).max()  # random weights: tiny outputs
    np.testing.assert_allclose(features[1][:1] / scale, expected / scale, rtol=1e-4, atol=1e-4)
    assert np.abs(features[0][:1] - features[1][:1]).max() > 0.1 * scale  # not the first file's cached features


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "pearson", "hamming"])
def test_engine_ranks_the_query_image_first_for_every_metric(metric, folder, hash_model, tmp_path):
    config = model_for(metric, hash_model)
    collection = image_folder(folder, progress=False)
    engine = index_collection(collection, config, str(tmp_path / "bundle"), source=folder, metric=metric,
                              workdir=str(tmp_path / "work"), progress=False)
    assert engine.index.metric == metric
    with open(os.path.join(folder, QUERY), "rb") as f:
        results = engine.search_images([f.read()], k=6)[0]
    assert results[0].id == QUERY and results[0].score == pytest.approx(SELF_SCORE[metric], abs=1e-4)
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))  # higher is closer, whatever the metric
    reloaded = RetrievalEngine.load(str(tmp_path / "bundle"))
    with open(os.path.join(folder, QUERY), "rb") as f:
        assert reloaded.search_images([f.read()], k=1)[0][0].id == QUERY


@pytest.mark.parametrize("metric", ["euclidean", "dot", "pearson", "hamming"])
def test_tfr_index_and_search_rank_the_query_image_first(metric, folder, hash_model, tmp_path, capsys):
    workdir = str(tmp_path / "work")
    model_flags = ["--model-config", str(tmp_path / "model.json")] if metric == "hamming" else SMALL_FLAGS
    if metric == "hamming":
        hash_model.save(str(tmp_path / "model.json"))
    assert main(["--workdir", workdir, "index", "--dataset", folder, "--name", "m", "--metric", metric,
                 *model_flags]) == 0
    assert main(["--workdir", workdir, "search", os.path.join(folder, QUERY), "--index", "m", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].endswith(f"({'hash' if metric == 'hamming' else 'baseline'}, {metric})")
    score, _, image_id = lines[-3].split()[1:4]
    assert image_id == QUERY and float(score) == pytest.approx(SELF_SCORE[metric], abs=1e-3)


def test_a_hashing_model_takes_only_hamming_and_hamming_only_a_hashing_model(folder, hash_model, tmp_path, capsys):
    hash_model.save(str(tmp_path / "model.json"))
    assert main(["--workdir", str(tmp_path), "index", "--dataset", folder, "--metric", "cosine",
                 "--model-config", str(tmp_path / "model.json")]) == 2
    assert "compared by Hamming distance" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path), "index", "--dataset", folder, "--metric", "hamming", *SMALL_FLAGS]) == 2
    assert "Hamming distance needs a hashing model" in capsys.readouterr().err
    # without --metric, a hashing model gets its own metric
    assert main(["--workdir", str(tmp_path), "index", "--dataset", folder, "--name", "codes",
                 "--model-config", str(tmp_path / "model.json")]) == 0
    assert "(hamming)" in capsys.readouterr().out
    engine = RetrievalEngine.load(os.path.join(str(tmp_path), "indexes", "codes"))
    assert engine.index.get_vectors([0]).shape == (1, 8)  # 8 bytes per image
    with pytest.raises(InvalidInputError, match="binary codes cannot be expanded"):
        engine.search(engine.vectors([0]), k=3, expand=2)


@pytest.mark.parametrize("metric", ["euclidean", "hamming"])
def test_the_web_api_ranks_the_query_image_first(metric, folder, hash_model, tmp_path):
    from tf_retrieval.web.app import create_app

    config = model_for(metric, hash_model)
    engine = index_collection(image_folder(folder, progress=False), config, str(tmp_path / "bundle"), source=folder,
                              metric=metric, workdir=str(tmp_path), progress=False)
    client = create_app({config.name: engine}).test_client()
    with open(os.path.join(folder, QUERY), "rb") as f:
        answer = client.post("/api/search", data={"image": (io.BytesIO(f.read()), "q.png"), "k": "4"}).get_json()
    first = answer["results"][0]
    assert first["id"] == QUERY and first["score"] == pytest.approx(SELF_SCORE[metric], abs=1e-4)
    by_id = client.post("/api/search", json={"id": QUERY, "k": 3}).get_json()  # a database image: itself left out
    assert QUERY not in [r["id"] for r in by_id["results"]] and len(by_id["results"]) == 3
