"""Proxy losses: a learned proxy per training class, added to the triplet loss as an option.

The triplet loss stays the product's loss; `TrainConfig.proxy_loss` adds one of these terms, which the metric-learning
literature found stronger on classes seen in training:

- "cosface" (normalised softmax with an additive cosine margin, Wang et al. 2018; the classification half of "bag of
  tricks", Luo et al. 2019, with its label smoothing): cross-entropy over `scale * (cos(x, proxy_c) - margin [c = y])`.
- "proxy-anchor" (Kim et al. 2020): every proxy is an anchor pulling the batch's images of its class and pushing the
  others, `1/|P+| sum_p log(1 + sum_{x in X+_p} e^{-alpha (s - delta)}) + 1/|P| sum_p log(1 + sum_{x in X-_p}
  e^{alpha (s + delta)})`.

The proxies live in the trainable model only (`ClassProxies`); the saved head does not need them to embed.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tf_retrieval.config import PROXY_LOSSES
from tf_retrieval.errors import InvalidInputError


#: Proxies start short: Adam moves every weight by about the learning rate per step, so short proxies turn fast, as the
#: 100x learning rate of proxies in Kim et al. does.
PROXY_STDDEV = 0.01


@keras.saving.register_keras_serializable(package="tf_retrieval")
class ClassProxies(keras.layers.Layer):
    """One learned unit vector per class: maps embeddings [n, d] to their cosine with every proxy [n, classes]."""

    def __init__(self, classes: int, **kwargs):
        super().__init__(**kwargs)
        if int(classes) < 2:
            raise InvalidInputError(f"proxy losses need at least 2 training classes, got {classes}")
        self.classes = int(classes)

    def build(self, input_shape):
        self.proxies = self.add_weight(shape=(int(input_shape[-1]), self.classes), name="proxies",
                                       initializer=keras.initializers.RandomNormal(stddev=PROXY_STDDEV))

    def call(self, embeddings):
        embeddings = keras.ops.cast(embeddings, "float32")
        unit = embeddings / keras.ops.maximum(keras.ops.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        proxies = self.proxies / keras.ops.maximum(keras.ops.norm(self.proxies, axis=0, keepdims=True), 1e-12)
        return keras.ops.matmul(unit, proxies)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def cosface_loss(labels: tf.Tensor, cosines: tf.Tensor, scale: float = 16.0, margin: float = 0.1,
                 label_smoothing: float = 0.1) -> tf.Tensor:
    """Mean cross-entropy of `scale * (cosines - margin * onehot(labels))` against label-smoothed targets.

    Args:
      labels: class indices [n] in 0..classes-1.
      cosines: cosine of each embedding with each class proxy [n, classes].
    """
    onehot = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), tf.shape(cosines)[1], dtype=cosines.dtype)
    logits = scale * (cosines - margin * onehot)
    targets = onehot * (1.0 - label_smoothing) + label_smoothing / tf.cast(tf.shape(cosines)[1], cosines.dtype)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))


def proxy_anchor_loss(labels: tf.Tensor, cosines: tf.Tensor, alpha: float = 32.0, delta: float = 0.1) -> tf.Tensor:
    """Proxy-Anchor loss (Kim et al. 2020) of a batch.

    Args:
      labels: class indices [n] in 0..classes-1.
      cosines: cosine of each embedding with each class proxy [n, classes].
    """
    positive = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), tf.shape(cosines)[1], dtype=cosines.dtype)
    negative = 1.0 - positive
    # log(1 + sum exp(z)) over the masked entries of each proxy's column, computed stably.
    pull = tf.reduce_logsumexp(tf.concat([tf.zeros_like(cosines[:1]),
                                          tf.where(positive > 0, -alpha * (cosines - delta), -1e9)], axis=0), axis=0)
    push = tf.reduce_logsumexp(tf.concat([tf.zeros_like(cosines[:1]),
                                          tf.where(negative > 0, alpha * (cosines + delta), -1e9)], axis=0), axis=0)
    with_positives = tf.reduce_max(positive, axis=0)
    pull = tf.math.divide_no_nan(tf.reduce_sum(pull * with_positives), tf.reduce_sum(with_positives))
    return pull + tf.reduce_mean(push)


def proxy_loss(name: str):
    """The loss function called `name` (one of `PROXY_LOSSES`): (labels, cosines) -> scalar."""
    functions = {"cosface": cosface_loss, "proxy-anchor": proxy_anchor_loss}
    if name not in functions:
        raise InvalidInputError(f"unknown proxy loss {name!r}; choose one of {', '.join(PROXY_LOSSES)}")
    return functions[name]
