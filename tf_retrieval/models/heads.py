"""Trainable parts of the fine-tuned embedder: the Siamese head, the top of a backbone, and hashing codes.

The Siamese head maps backbone features to the embedding: Dense -> BatchNorm -> ReLU -> Dropout -> Dense(d) ->
L2-normalise. With `hash_bits`, the last layer gives codes instead, which `BinaryCodes` (or `vectors.pack_codes`) turns
into bits, ranked by Hamming distance: tanh(Dense(bits)) pulled towards +-1 by a quantisation penalty (Deep Supervised
Hashing, `hashing="tanh"`), or the sign of Dense(bits) itself with a straight-through gradient (GreedyHash, Su et al.
2018, `hashing="greedy"`), so training already sees the binary codes it will serve.

`split_backbone` cuts a frozen backbone's trunk at a named layer into a bottom (run once, its activations cached) and a
top that shares the trunk's layers, so training the top on cached activations updates the trunk itself; the whole
backbone is then saved as an ordinary weights file that `build_backbone(weights=path)` loads.
"""
from __future__ import annotations

import os

import keras
import numpy as np

from tf_retrieval.config import HASHINGS
from tf_retrieval.errors import InvalidInputError, MissingError


@keras.saving.register_keras_serializable(package="tf_retrieval")
class L2Normalize(keras.layers.Layer):
    """Scales each row to unit L2 norm."""

    def call(self, x):
        return x / keras.ops.maximum(keras.ops.norm(x, axis=-1, keepdims=True), 1e-12)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class QuantizationPenalty(keras.layers.Layer):
    """Identity on tanh codes that adds `weight * mean((|h| - 1)^2)` to the loss, pushing codes towards +-1."""

    def __init__(self, weight: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, codes):
        self.add_loss(self.weight * keras.ops.mean(keras.ops.square(keras.ops.abs(codes) - 1.0)))
        return codes

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


@keras.saving.register_keras_serializable(package="tf_retrieval")
class GreedySign(keras.layers.Layer):
    """sign(h) forward, the identity backward (GreedyHash's straight-through sign), plus `weight * mean(||h| - 1|^3)`
    in the loss so the values it rounds stay near +-1."""

    def __init__(self, weight: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, h):
        self.add_loss(self.weight * keras.ops.mean(keras.ops.abs(keras.ops.abs(h) - 1.0) ** 3))
        signs = keras.ops.where(h >= 0, 1.0, -1.0)
        return h + keras.ops.stop_gradient(signs - h)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}




def build_head(input_shape: int | tuple[int, ...], embedding_dim: int = 128, hidden_dim: int = 512,
               dropout: float = 0.1, hash_bits: int | None = None, quantization_weight: float = 0.1,
               hashing: str = "tanh", name: str = "head") -> keras.Model:
    """The Siamese head: features [n, input_dim] -> unit-length embeddings [n, embedding_dim] (or tanh codes).

    Args:
      input_shape: feature dimension (or shape) of the backbone output.
      embedding_dim: output size (ignored with `hash_bits`).
      hidden_dim: width of the hidden layer; 0 for a single linear projection.
      dropout: dropout rate after the hidden layer.
      hash_bits: train a hashing head with this many bits instead (outputs tanh codes in (-1, 1)).
      quantization_weight: weight of the penalty pulling codes towards +-1 (hashing only).
      hashing: "tanh" (codes in (-1, 1), binarised when served) or "greedy" (codes in {-1, 1} already while training).
    """
    if embedding_dim < 1 or hidden_dim < 0 or not 0 <= dropout < 1 or (hash_bits is not None and hash_bits < 1):
        raise InvalidInputError(f"bad head sizes: embedding_dim={embedding_dim}, hidden_dim={hidden_dim}, dropout={dropout}, "
                         f"hash_bits={hash_bits}")
    if hashing not in HASHINGS:
        raise InvalidInputError(f"unknown hashing {hashing!r}; choose one of {', '.join(HASHINGS)}")
    shape = (input_shape,) if isinstance(input_shape, (int, np.integer)) else tuple(input_shape)
    features = keras.Input(shape, name="features")
    x = features
    if hidden_dim:
        x = keras.layers.Dense(hidden_dim, use_bias=False, name="hidden")(x)
        # synchronized: the statistics of the whole batch when a tf.distribute strategy splits it over replicas
        x = keras.layers.BatchNormalization(synchronized=True, name="hidden_bn")(x)
        x = keras.layers.ReLU(name="hidden_relu")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="hidden_dropout")(x)
    if hash_bits and hashing == "greedy":
        outputs = GreedySign(quantization_weight, name="signs")(keras.layers.Dense(hash_bits, name="codes")(x))
    elif hash_bits:
        x = keras.layers.Dense(hash_bits, activation="tanh", name="codes")(x)
        outputs = QuantizationPenalty(quantization_weight, name="quantization")(x)
    else:
        outputs = L2Normalize(name="embedding")(keras.layers.Dense(embedding_dim, name="projection")(x))
    return keras.Model(features, outputs, name=name)


def load_head(path: str) -> keras.Model:
    """A head saved by training (`.keras`); importing this module registers its custom layers for deserialisation."""
    if not os.path.isfile(path):
        raise MissingError(f"head file not found: {path}")
    return keras.models.load_model(path, compile=False)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class BinaryCodes(keras.layers.Layer):
    """The sign of each output as +-1 floats (0 counts as +1): a hashing head's codes as served."""

    def call(self, codes):
        return keras.ops.where(codes >= 0, 1.0, -1.0)


def trunk_of(backbone: keras.Model) -> keras.Model:
    """The nested trunk model (e.g. keras.applications' network) inside a `build_backbone` model."""
    trunks = [layer for layer in backbone.layers if isinstance(layer, keras.Model)]
    if len(trunks) != 1:
        raise InvalidInputError(f"{backbone.name}: expected one nested trunk model, found {len(trunks)}")
    return trunks[0]


def split_backbone(backbone: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model]:
    """Cuts a `build_backbone` model at trunk layer `layer_name`.

    Returns:
      (bottom, top): bottom maps pixels [n, s, s, 3] in 0..255 to the layer's activations; top maps those activations to
      the pooled features. Together they compute `backbone`. The top shares the trunk's layers (training it trains them);
      its batch-normalisation layers stay frozen (inference statistics), as usual when fine-tuning with small batches.

    Raises:
      ValueError: no such layer in the trunk.
    """
    trunk = trunk_of(backbone)
    names = [layer.name for layer in trunk.layers]
    if layer_name not in names:
        blocks = [n for n in names if n.endswith(("_add", "_project_bn"))]
        raise InvalidInputError(f"layer {layer_name!r} is not in {trunk.name}; block outputs are e.g. {blocks[-6:]}")
    cut = trunk.get_layer(layer_name).output
    trunk_bottom = keras.Model(trunk.input, cut, name=f"{trunk.name}_bottom")
    trunk_top = keras.Model(cut, trunk.output, name=f"{trunk.name}_top")

    images = backbone.input
    preprocessing = backbone.get_layer("preprocess")
    bottom = keras.Model(images, trunk_bottom(preprocessing(images)), name=f"{backbone.name}_to_{layer_name}")

    activations = keras.Input(tuple(cut.shape[1:]), name="activations")
    pooled = backbone.layers[-1](trunk_top(activations))
    top = keras.Model(activations, pooled, name=f"{backbone.name}_from_{layer_name}")
    trunk_top.trainable = True  # recursive: then the batch normalisation layers are frozen again
    for layer in trunk_top.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return bottom, top
