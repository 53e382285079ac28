import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_retrieval.models.backbones import build_backbone
from tf_retrieval.data.images import decode_image, resize_and_crop
from tf_retrieval.features.embedding import build_embedding_model
from tf_retrieval.serving.export import export_model, next_version


def encode(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_embedding_model(build_backbone("mobilenet_v2", 32, "avg", weights=None))
    base = str(tmp_path_factory.mktemp("models"))
    path = export_model(model, base, "tiny", image_size=32, config={"backbone": "mobilenet_v2"})
    return model, base, path


def test_layout_and_config(exported):
    _, base, path = exported
    assert path == os.path.join(base, "tiny", "1")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    config = json.load(open(os.path.join(path, "assets.extra", "config.json")))
    assert config["embedding_dim"] == 1280 and config["image_size"] == 32 and config["backbone"] == "mobilenet_v2"
    assert next_version(os.path.join(base, "tiny")) == 2
    # TF Serving's --model_config_file for docker-compose (base dir mounted at /models)
    assert open(os.path.join(base, "models.config")).read() == (
        'model_config_list {\n  config {\n    name: "tiny"\n    base_path: "/models/tiny"\n'
        '    model_platform: "tensorflow"\n  }\n}\n')


def test_both_signatures_match_the_in_process_model(exported, rng):
    model, _, path = exported
    loaded = tf.saved_model.load(path)
    pixels = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = model.predict(pixels, verbose=0)
    got = loaded.signatures["embed_pixels"](images=tf.constant(pixels))["embedding"].numpy()
    assert np.abs(got - expected).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)

    images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    encoded = [encode(images[0], "JPEG"), encode(images[1], "PNG")]
    # In process: PIL decode + the same resize; served: TF decode inside the SavedModel.
    reference = model.predict(np.stack([resize_and_crop(decode_image(b), 32).numpy() for b in encoded]), verbose=0)
    served = loaded.signatures["serving_default"](images=tf.constant(encoded))["embedding"].numpy()
    assert np.abs(served - reference).max() <= 1e-5


def test_the_litert_file_beside_the_saved_model_gives_the_same_embeddings(exported, rng):
    from tf_retrieval.features.litert import LiteRTModel
    from tf_retrieval.serving.export import LITERT_FILE

    model, _, path = exported
    assert json.load(open(os.path.join(path, "assets.extra", "config.json")))["litert"] == "assets.extra/model.tflite"
    with open(os.path.join(path, LITERT_FILE), "rb") as f:
        interpreter = LiteRTModel(f.read())
    pixels = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = model.predict(pixels, verbose=0)
    got = interpreter(pixels)
    assert got.shape == expected.shape and np.sum(got * expected, axis=1).min() >= 0.9999


def test_bad_bytes_fail_clearly(exported):
    _, _, path = exported
    loaded = tf.saved_model.load(path)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](images=tf.constant([b"not an image"]))


def test_versions_are_immutable_and_names_checked(exported):
    model, base, _ = exported
    with pytest.raises(ValueError, match="exists already"):
        export_model(model, base, "tiny", image_size=32, version=1)
    with pytest.raises(ValueError, match="may only contain"):
        export_model(model, base, "bad/name", image_size=32)
    assert sorted(os.listdir(os.path.join(base, "tiny"))) == ["1"]  # no temp folder left behind


def test_a_flip_model_serves_an_image_and_its_mirror_alike(tmp_path, rng):
    """Test-time flip lives in the model: the SavedModel (and so TF Serving) pools the image with its mirror."""
    model = build_embedding_model(build_backbone("mobilenet_v2", 32, "avg", weights=None, flip=True))
    path = export_model(model, str(tmp_path), "flip", image_size=32, config={"backbone": "mobilenet_v2", "flip": True})
    embed = tf.saved_model.load(path).signatures["embed_pixels"]
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    served = embed(images=tf.constant(pixels))["embedding"].numpy()
    mirrored = embed(images=tf.constant(np.ascontiguousarray(pixels[:, :, ::-1])))["embedding"].numpy()
    np.testing.assert_allclose(served, mirrored, atol=1e-5)
    np.testing.assert_allclose(served, model.predict(pixels, verbose=0), atol=1e-5)
    # and so does its LiteRT copy, which `tfr serve` answers with
    from tf_retrieval.serving.server import litert_signatures

    fast = litert_signatures(path)["embed_pixels"]
    np.testing.assert_allclose(fast(tf.constant(np.ascontiguousarray(pixels[:, :, ::-1])))["embedding"], served,
                               atol=1e-4)
    plain = build_embedding_model(build_backbone("mobilenet_v2", 32, "avg", weights=None))
    assert np.abs(plain.predict(pixels, verbose=0) - plain.predict(pixels[:, :, ::-1], verbose=0)).max() > 1e-3
