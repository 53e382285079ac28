import keras
import numpy as np
import pytest

from tf_retrieval.config import ModelConfig, TrainConfig
from tf_retrieval.storage import file_digest
from tf_retrieval.models.backbones import (GeneralizedMeanPooling, ImagePreprocessing, ScaleMean, backbone_id,
                                          backbone_of, build_backbone)


@pytest.mark.parametrize("mode, reference", [
    ("torch", keras.applications.densenet.preprocess_input),
    ("caffe", keras.applications.resnet50.preprocess_input),
    ("tf", keras.applications.mobilenet_v2.preprocess_input),
])
def test_preprocessing_matches_keras_applications(mode, reference, rng):
    pixels = rng.uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = reference(pixels.copy())
    np.testing.assert_allclose(np.asarray(ImagePreprocessing(mode)(pixels)), expected, rtol=1e-5, atol=1e-4)


def test_preprocessing_hand_values():
    pixel = np.array([[[[255.0, 0.0, 127.5]]]], "float32")
    torch = np.asarray(ImagePreprocessing("torch")(pixel))[0, 0, 0]
    np.testing.assert_allclose(torch, [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225], rtol=1e-5)
    caffe = np.asarray(ImagePreprocessing("caffe")(pixel))[0, 0, 0]
    np.testing.assert_allclose(caffe, [127.5 - 103.939, 0 - 116.779, 255 - 123.68], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        ImagePreprocessing("bgr")


def test_gem_pooling_between_average_and_max(rng):
    x = rng.uniform(0.1, 2.0, (2, 3, 3, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(GeneralizedMeanPooling(p=1.0)(x)), x.mean(axis=(1, 2)), rtol=1e-5)
    gem3 = np.asarray(GeneralizedMeanPooling(p=3.0)(x))
    np.testing.assert_allclose(gem3, np.mean(x ** 3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
    assert (gem3 >= x.mean(axis=(1, 2)) - 1e-6).all() and (gem3 <= x.max(axis=(1, 2)) + 1e-6).all()
    layer = GeneralizedMeanPooling.from_config(GeneralizedMeanPooling(p=2.5).get_config())
    assert layer.p == 2.5
    with pytest.raises(ValueError, match="must be positive"):
        GeneralizedMeanPooling(p=0)


@pytest.mark.parametrize("pooling", ["avg", "gem", "max"])
def test_build_backbone_shapes_and_frozen(pooling, rng):
    model = build_backbone("mobilenet_v2", image_size=32, pooling=pooling, weights=None)
    assert model.output_shape == (None, 1280)
    assert not model.trainable_weights
    features = np.asarray(model(rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")))
    assert features.shape == (2, 1280) and np.isfinite(features).all()
    assert model.name == f"mobilenet_v2-32px-{pooling}-random"


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_random_weights_are_the_same_every_time_and_leave_the_global_generators_alone(name):
    import random

    random.seed(123)
    np.random.seed(7)
    expected = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(7)
    first = build_backbone(name, 32, weights=None)
    assert (random.random(), np.random.rand()) == expected  # building drew nothing from the caller's generators
    keras.utils.set_random_seed(5)
    random.random()
    again = build_backbone(name, 32, weights=None)
    assert len(first.get_weights()) == len(again.get_weights()) > 0
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vgg99'; choose one of efficientnet_lite0"):
        build_backbone("vgg99", 32, weights=None)
    with pytest.raises(ValueError, match="unknown pooling"):
        build_backbone("mobilenet_v2", 32, pooling="median", weights=None)
    with pytest.raises(ValueError, match="at least 32 px"):
        build_backbone("mobilenet_v2", 16, weights=None)


def test_backbone_id_names_weights_files():
    assert backbone_id("resnet50", 96, "gem", "imagenet") == "resnet50-96px-gem-imagenet"
    assert backbone_id("resnet50", 96, "avg", "/nowhere/my weights.h5") == "resnet50-96px-avg-my_weights_h5_missing"


def test_backbone_id_changes_with_the_weights_files_content(tmp_path):
    weights = tmp_path / "trunk.weights.h5"
    weights.write_bytes(b"first")
    first = backbone_id("resnet50", 96, "avg", str(weights))
    assert first == f"resnet50-96px-avg-trunk_weights_h5_{file_digest(weights)[:8]}"
    weights.write_bytes(b"second, rewritten in place")
    assert backbone_id("resnet50", 96, "avg", str(weights)) not in (first, backbone_id("resnet50", 96, "avg", None))


def test_scale_mean_is_the_power_mean_of_the_scales(rng):
    scales = [rng.uniform(0.1, 2.0, (2, 4)).astype("float32") for _ in range(3)]
    np.testing.assert_allclose(np.asarray(ScaleMean(p=1.0)(scales)), np.mean(scales, axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ScaleMean(p=3.0)(scales)), np.mean(np.power(scales, 3), axis=0) ** (1 / 3),
                               rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "gem", "max"])
def test_multiscale_backbone_pools_over_the_scaled_inputs(pooling, rng):
    """[1, 0.75] at 64 px: the trunk sees the input and its bilinear 48 px copy; the features combine both."""
    import tensorflow as tf

    model = build_backbone("mobilenet_v2", image_size=64, pooling=pooling, weights=None, scales=(1.0, 0.75))
    assert model.name == f"mobilenet_v2-64px-x1_0.75-{pooling}-random" and not model.trainable_weights
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    trunk = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    pixels = ImagePreprocessing("tf")(images)
    maps = [trunk(pixels), trunk(tf.image.resize(pixels, (48, 48), method="bilinear"))]
    if pooling == "max":
        expected = np.maximum(*[np.max(m, axis=(1, 2)) for m in maps])
    else:
        p = 3.0 if pooling == "gem" else 1.0
        pooled = [np.mean(np.maximum(m, 1e-6) ** p, axis=(1, 2)) ** (1 / p) for m in maps]
        expected = np.mean(np.power(pooled, p), axis=0) ** (1 / p)
    np.testing.assert_allclose(np.asarray(model(images)), expected, rtol=2e-4, atol=1e-5)


def test_model_config_scales_validation_and_ids():
    single = ModelConfig(image_size=96)
    assert single.scales == (1.0,) and single.backbone_key() == "efficientnet_lite0-96px-tfinputs-avg-imagenet"
    multi = ModelConfig.from_dict({**single.to_dict(), "image_size": 288, "scales": [1, 0.889, 0.778]})
    assert multi.scales == (1.0, 0.889, 0.778)  # JSON lists come back as tuples
    assert multi.backbone_key() == "efficientnet_lite0-288px-x1_0.889_0.778-tfinputs-avg-imagenet"
    assert "x1_0.889_0.778" in multi.model_id() and multi.model_id() != single.model_id()
    assert backbone_of(ModelConfig(backbone="mobilenet_v2", image_size=32, weights=None)).name == \
        "mobilenet_v2-32px-avg-random"
    for scales, message in [([1.5], "distinct factors in \\(0, 1\\]"), ([1, 1], "distinct"), ([], "distinct"),
                            (["big"], "list of numbers"), ([1, 0.2], "go below 32 px"),
                            ([1, 0.5, 0.503], "the same size twice: \\[96, 48, 48\\]")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(image_size=96, scales=scales)
    with pytest.raises(ValueError, match="trains its head only"):
        TrainConfig(model=ModelConfig(name="finetuned", scales=(1, 0.75), train_from="block12_add"))


def test_each_backbone_runs_on_its_own_input_normalisation_and_ids_name_the_one_older_models_lacked(rng):
    """`ModelConfig.preprocessing`: None is the backbone's own; EfficientNet-Lite's is "tf" (x / 127.5 - 1, what its
    checkpoints were trained on). Its models ran on "torch" before, so ids leave "torch" unnamed for it (the ids,
    caches and records of those models stay valid) and name "tf"."""
    default = ModelConfig(image_size=32, weights=None)
    torch_inputs = ModelConfig.from_dict({**default.to_dict(), "preprocessing": "torch"})
    assert default.backbone_key() == "efficientnet_lite0-32px-tfinputs-avg-random" and default.preprocessing is None
    assert ModelConfig(image_size=32, weights=None, preprocessing="tf").backbone_key() == default.backbone_key()
    assert torch_inputs.backbone_key() == "efficientnet_lite0-32px-avg-random"
    assert ModelConfig(backbone="resnet50", image_size=32).backbone_key() == "resnet50-32px-avg-imagenet"
    assert ModelConfig(backbone="resnet50", image_size=32, preprocessing="tf").backbone_key() == (
        "resnet50-32px-tfinputs-avg-imagenet")
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    model, older = backbone_of(default), backbone_of(torch_inputs)
    assert (model.get_layer("preprocess").mode, older.get_layer("preprocess").mode) == ("tf", "torch")
    assert (model.name, older.name) == (default.backbone_key(), torch_inputs.backbone_key())
    np.testing.assert_allclose(model.get_layer("preprocess")(pixels), pixels / 127.5 - 1, atol=1e-6)
    assert not np.allclose(np.asarray(model(pixels)), np.asarray(older(pixels)), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="unknown preprocessing 'inception'; choose one of caffe, torch, tf, none"):
        ModelConfig(preprocessing="inception")


def test_a_config_file_without_preprocessing_is_read_as_written_before_lite_ran_on_its_own_inputs(tmp_path):
    """Files (run and bundle model.json, recipes) from before the field existed ran EfficientNet-Lite on "torch"
    inputs: they still do, and keep their ids. Other backbones ran on their own; a written file says what it is."""
    old = {"name": "finetuned", "backbone": "efficientnet_lite2", "image_size": 192, "weights": "imagenet"}
    assert ModelConfig.from_dict(old).preprocessing == "torch"
    assert ModelConfig.from_dict(old).backbone_key() == "efficientnet_lite2-192px-avg-imagenet"
    assert ModelConfig.from_dict({"backbone": "resnet50"}).preprocessing is None
    assert ModelConfig.from_dict({}).preprocessing == "torch"  # the default backbone is EfficientNet-Lite0
    for config in (ModelConfig(), ModelConfig(preprocessing="torch"), ModelConfig(backbone="densenet121")):
        config.save(tmp_path / "model.json")
        assert ModelConfig.load(tmp_path / "model.json") == config
    recipe = TrainConfig.from_dict({"protocol": "cifar10-1", "model": old})
    assert recipe.model.preprocessing == "torch"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).model.preprocessing is None
