"""Triplet losses with online mining, ported from tensorflow-addons to Keras 3.

tensorflow-addons is end-of-life and does not import under Keras 3; this module keeps the semantics of
`tfa.losses.triplet_semihard_loss` / `triplet_hard_loss` (and `pairwise_distance` / `angular_distance`) and adds a
batch-all variant (Hermans et al. 2017). Every loss takes integer labels `y_true` [batch] or [batch, 1] and embeddings
`y_pred` [batch, dim], mines triplets inside the batch and returns one scalar. Half-precision embeddings are cast to
float32 for the maths and the loss is cast back, as tfa does.

Mining rules, for anchor a, positive p (same label, p != a) and negative n (other label), on distances d:

- semi-hard (FaceNet): per (a, p), the negative with the smallest d(a, n) that is still > d(a, p); if no negative is
  farther than the positive, the largest d(a, n) of the anchor. Loss: mean over all (a, p) of relu(d_ap - d_an + margin).
- hard (batch-hard): per anchor, the largest d(a, p) and the smallest d(a, n). Loss: mean over anchors of
  relu(d_ap - d_an + margin), or softplus(d_ap - d_an) with `soft=True`.
- batch-all: every valid (a, p, n) with relu(d_ap - d_an + margin); averaged over the triplets with a loss > 0
  (`average="positive"`) or over all valid triplets (`average="all"`).

Degenerate batches follow tfa: an anchor without negatives uses the smallest distance of its row (its self-distance) as
the "largest negative" (semi-hard) and the largest distance of its row as the "hardest negative" (hard); an anchor
without positives uses the smallest distance of its row as its "hardest positive" (hard) and adds nothing to the
semi-hard or batch-all averages. Unlike tfa, a batch with no positive pair (or no valid triplet) gives 0, not NaN.

Use with Keras: `model.compile(loss=TripletSemiHardLoss(margin=0.2))`, or `get("hard")`. The losses are batch-level
scalars, so `sample_weight` has no per-example meaning; leave it unset.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Union

import keras
import tensorflow as tf

from tf_retrieval.errors import InvalidInputError

logger = logging.getLogger(__name__)

DistanceMetric = Union[str, Callable[[tf.Tensor], tf.Tensor]]

DISTANCE_METRICS = ("L2", "squared-L2", "angular")
AVERAGES = ("positive", "all")

__all__ = [
    "pairwise_distance", "angular_distance", "triplet_semihard_loss", "triplet_hard_loss", "triplet_batch_all_loss",
    "TripletSemiHardLoss", "TripletHardLoss", "TripletBatchAllLoss", "get", "DISTANCE_METRICS",
]

_HALF_DTYPES = (tf.float16, tf.bfloat16)


# ----------------------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------------------

def pairwise_distance(embeddings: tf.Tensor, squared: bool = False) -> tf.Tensor:
    """Pairwise Euclidean distances [n, n] between the rows of `embeddings` [n, d], with tfa's numerics.

    Squared distances come from ||x||^2 + ||y||^2 - 2 x.y, clamped at 0; the square root adds 1e-16 where the squared
    distance is 0 and then zeroes those entries, so the gradient stays finite; the diagonal is exactly 0. Half-precision
    inputs are computed in float32 and the result is cast back.

    Args:
        embeddings: float tensor [n, d].
        squared: return squared distances instead of distances.

    Returns:
        Float tensor [n, n] with the dtype of `embeddings`.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    _check_embeddings(embeddings)
    features = tf.cast(embeddings, tf.float32) if embeddings.dtype in _HALF_DTYPES else embeddings
    squared_norms = tf.reduce_sum(tf.square(features), axis=1, keepdims=True)
    distances_squared = squared_norms + tf.transpose(squared_norms) - 2.0 * tf.matmul(features, features,
                                                                                       transpose_b=True)
    distances_squared = tf.maximum(distances_squared, 0.0)
    zero_mask = tf.cast(tf.less_equal(distances_squared, 0.0), features.dtype)
    if squared:
        distances = distances_squared
    else:
        distances = tf.sqrt(distances_squared + zero_mask * 1e-16) * (1.0 - zero_mask)
    off_diagonal = 1.0 - tf.eye(tf.shape(features)[0], dtype=features.dtype)
    return tf.cast(distances * off_diagonal, embeddings.dtype)


def angular_distance(embeddings: tf.Tensor) -> tf.Tensor:
    """Cosine distances 1 - cos(x_i, x_j) [n, n] between the rows of `embeddings` [n, d], clamped at >= 1e-16 (tfa's
    comment says 1e-16, its code clamps at 0: the mining compares distances strictly, so no triplet differs).

    Rows are L2-normalised first, so the scale of the embeddings does not matter.

    Args:
        embeddings: float tensor [n, d].

    Returns:
        Float tensor [n, n] with the dtype of `embeddings`.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    _check_embeddings(embeddings)
    features = tf.cast(embeddings, tf.float32) if embeddings.dtype in _HALF_DTYPES else embeddings
    features = tf.math.l2_normalize(features, axis=1)
    distances = tf.maximum(1.0 - tf.matmul(features, features, transpose_b=True), 1e-16)
    return tf.cast(distances, embeddings.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Losses (functions)
# ----------------------------------------------------------------------------------------------------------------------

def triplet_semihard_loss(y_true: tf.Tensor, y_pred: tf.Tensor, margin: float = 1.0,
                          distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Triplet loss with semi-hard negative mining (tfa `triplet_semihard_loss`, FaceNet).

    For every positive pair (a, p) the negative is the closest one that is still farther from the anchor than p; if
    there is none, the farthest negative of the anchor. Averaged over all positive pairs.

    Args:
        y_true: integer labels [batch] or [batch, 1].
        y_pred: embeddings [batch, dim] (float16/bfloat16 are computed in float32).
        margin: margin added to d_ap - d_an.
        distance_metric: "L2", "squared-L2", "angular", or a callable mapping embeddings [n, d] to distances [n, n].

    Returns:
        Scalar loss with the dtype of `y_pred` (0 if the batch holds no positive pair).
    """
    labels, distances, dtype = _prepare(y_true, y_pred, distance_metric)
    same, negatives = _adjacency(labels)
    positives = _positive_mask(same)

    # farther[a, p, n]: n is a negative of a and d(a, n) > d(a, p).
    d_ap = distances[:, :, tf.newaxis]
    d_an = distances[:, tf.newaxis, :]
    farther = tf.logical_and(negatives[:, tf.newaxis, :], tf.greater(d_an, d_ap))
    has_farther = tf.reduce_any(farther, axis=2)
    closest_farther = tf.squeeze(_masked_min(d_an, farther, axis=2), axis=2)   # [a, p]
    farthest_negative = _masked_max(distances, negatives, axis=1)                     # [a, 1]
    semi_hard = tf.where(has_farther, closest_farther, farthest_negative)

    pair_losses = tf.nn.relu(margin + distances - semi_hard) * tf.cast(positives, tf.float32)
    loss = tf.math.divide_no_nan(tf.reduce_sum(pair_losses), tf.reduce_sum(tf.cast(positives, tf.float32)))
    return tf.cast(loss, dtype)


def triplet_hard_loss(y_true: tf.Tensor, y_pred: tf.Tensor, margin: float = 1.0, soft: bool = False,
                      distance_metric: DistanceMetric = "L2") -> tf.Tensor:
    """Batch-hard triplet loss (tfa `triplet_hard_loss`, Hermans et al. 2017).

    Each anchor is paired with its farthest positive and its closest negative; averaged over anchors.

    Args:
        y_true: integer labels [batch] or [batch, 1].
        y_pred: embeddings [batch, dim] (float16/bfloat16 are computed in float32).
        margin: margin added to d_ap - d_an (ignored when `soft`).
        soft: use the soft margin softplus(d_ap - d_an) instead of relu(d_ap - d_an + margin).
        distance_metric: "L2", "squared-L2", "angular", or a callable mapping embeddings [n, d] to distances [n, n].

    Returns:
        Scalar loss with the dtype of `y_pred`.
    """
    labels, distances, dtype = _prepare(y_true, y_pred, distance_metric)
    same, negatives = _adjacency(labels)
    hardest_negative = _masked_min(distances, negatives, axis=1)
    hardest_positive = _masked_max(distances, _positive_mask(same), axis=1)
    if soft:
        losses = tf.nn.softplus(hardest_positive - hardest_negative)
    else:
        losses = tf.nn.relu(hardest_positive - hardest_negative + margin)
    return tf.cast(tf.reduce_mean(losses), dtype)


def triplet_batch_all_loss(y_true: tf.Tensor, y_pred: tf.Tensor, margin: float = 1.0,
                           distance_metric: DistanceMetric = "L2", average: str = "positive") -> tf.Tensor:
    """Batch-all triplet loss (Hermans et al. 2017): every valid (anchor, positive, negative) of the batch.

    Args:
        y_true: integer labels [batch] or [batch, 1].
        y_pred: embeddings [batch, dim] (float16/bfloat16 are computed in float32).
        margin: margin added to d_ap - d_an.
        distance_metric: "L2", "squared-L2", "angular", or a callable mapping embeddings [n, d] to distances [n, n].
        average: "positive" averages over the triplets with a loss > 0 (the paper's choice, it does not fade as the
            easy triplets pile up); "all" averages over all valid triplets.

    Returns:
        Scalar loss with the dtype of `y_pred` (0 if no triplet qualifies).

    Raises:
        ValueError: unknown `average`.
    """
    if average not in AVERAGES:
        raise InvalidInputError(f"average must be one of {AVERAGES}, got {average!r}")
    labels, distances, dtype = _prepare(y_true, y_pred, distance_metric)
    same, negatives = _adjacency(labels)
    # valid[a, p, n]: p is a positive of a and n a negative of a.
    valid = tf.logical_and(_positive_mask(same)[:, :, tf.newaxis], negatives[:, tf.newaxis, :])
    valid = tf.cast(valid, tf.float32)
    triplet_losses = tf.nn.relu(distances[:, :, tf.newaxis] - distances[:, tf.newaxis, :] + margin) * valid
    if average == "positive":
        count = tf.reduce_sum(tf.cast(tf.greater(triplet_losses, 0.0), tf.float32))
    else:
        count = tf.reduce_sum(valid)
    return tf.cast(tf.math.divide_no_nan(tf.reduce_sum(triplet_losses), count), dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------

def _check_embeddings(embeddings: tf.Tensor) -> None:
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise InvalidInputError(f"embeddings must be a [batch, dim] matrix, got shape {embeddings.shape}; flatten or reshape "
                         f"them to rank 2 first")
    if not embeddings.dtype.is_floating:
        raise InvalidInputError(f"embeddings must be floating point, got dtype {embeddings.dtype.name}; cast them to float32")


def _distance_matrix(embeddings: tf.Tensor, distance_metric: DistanceMetric) -> tf.Tensor:
    if callable(distance_metric):
        return tf.cast(distance_metric(embeddings), tf.float32)
    if distance_metric == "L2":
        return pairwise_distance(embeddings, squared=False)
    if distance_metric == "squared-L2":
        return pairwise_distance(embeddings, squared=True)
    if distance_metric == "angular":
        return angular_distance(embeddings)
    raise InvalidInputError(f"distance_metric must be one of {DISTANCE_METRICS} or a callable embeddings [n, d] -> distances "
                     f"[n, n], got {distance_metric!r}")


def _prepare(y_true: tf.Tensor, y_pred: tf.Tensor,
             distance_metric: DistanceMetric) -> tuple[tf.Tensor, tf.Tensor, tf.DType]:
    """Returns labels [batch], float32 distances [batch, batch] and the dtype the loss is returned in."""
    embeddings = tf.convert_to_tensor(y_pred)
    labels = tf.convert_to_tensor(y_true)
    _check_embeddings(embeddings)
    if labels.shape.rank is not None and not (labels.shape.rank == 1 or (labels.shape.rank == 2
                                                                          and labels.shape[1] in (1, None))):
        raise InvalidInputError(f"labels must have shape [batch] or [batch, 1], got {labels.shape}; pass one integer class id "
                         f"per embedding (not one-hot)")
    labels = tf.reshape(labels, [-1])
    if labels.shape[0] is not None and embeddings.shape[0] is not None and labels.shape[0] != embeddings.shape[0]:
        raise InvalidInputError(f"got {labels.shape[0]} labels for {embeddings.shape[0]} embeddings (shape "
                         f"{embeddings.shape}); pass one label per embedding")
    dtype = embeddings.dtype
    if dtype in _HALF_DTYPES:
        embeddings = tf.cast(embeddings, tf.float32)
    return labels, tf.cast(_distance_matrix(embeddings, distance_metric), tf.float32), dtype


def _adjacency(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(same label [b, b] incl. the diagonal, different label [b, b])."""
    same = tf.equal(labels[:, tf.newaxis], labels[tf.newaxis, :])
    return same, tf.logical_not(same)


def _positive_mask(same: tf.Tensor) -> tf.Tensor:
    """Same label, excluding each element paired with itself."""
    return tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(same)[0], dtype=tf.bool)))


def _masked_max(data: tf.Tensor, mask: tf.Tensor, axis: int) -> tf.Tensor:
    """Max of `data` over `mask` along `axis` (kept); the minimum along `axis` where the mask is empty (as tfa)."""
    fallback = tf.reduce_min(data, axis=axis, keepdims=True)
    return tf.reduce_max(tf.where(mask, data, fallback), axis=axis, keepdims=True)


def _masked_min(data: tf.Tensor, mask: tf.Tensor, axis: int) -> tf.Tensor:
    """Min of `data` over `mask` along `axis` (kept); the maximum along `axis` where the mask is empty (as tfa)."""
    fallback = tf.reduce_max(data, axis=axis, keepdims=True)
    return tf.reduce_min(tf.where(mask, data, fallback), axis=axis, keepdims=True)


def _check_distance_metric(distance_metric: DistanceMetric) -> None:
    if not callable(distance_metric) and distance_metric not in DISTANCE_METRICS:
        raise InvalidInputError(f"distance_metric must be one of {DISTANCE_METRICS} or a callable embeddings [n, d] -> "
                         f"distances [n, n], got {distance_metric!r}")


def _serialize_metric(distance_metric: DistanceMetric) -> Any:
    if callable(distance_metric):
        return keras.saving.serialize_keras_object(distance_metric)
    return distance_metric


def _deserialize_metric(distance_metric: Any) -> DistanceMetric:
    if isinstance(distance_metric, str) and distance_metric in DISTANCE_METRICS:
        return distance_metric
    return keras.saving.deserialize_keras_object(distance_metric)


# ----------------------------------------------------------------------------------------------------------------------
# Keras Loss classes
# ----------------------------------------------------------------------------------------------------------------------

class _TripletLoss(keras.losses.Loss):
    """Shared constructor/config for the triplet losses; subclasses implement `call`."""

    def __init__(self, margin: float = 1.0, distance_metric: DistanceMetric = "L2", name: str | None = None,
                 reduction: str | None = "sum_over_batch_size", dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_distance_metric(distance_metric)
        self.margin = float(margin)
        self.distance_metric = distance_metric

    def __call__(self, y_true, y_pred, sample_weight=None):
        """As `keras.losses.Loss.__call__`, but the labels keep their integer type: Keras would convert them to the
        loss's float dtype, where distinct labels can round to one (2**24 and 2**24 + 1 in float32), as tfa's did not."""
        if sample_weight is not None:
            raise InvalidInputError("the triplet losses are one value for the whole batch: they take no sample_weight")
        with tf.name_scope(self.name):  # half-precision embeddings stay as they are: `_prepare` computes in float32
            y_pred = y_pred if tf.is_tensor(y_pred) else tf.convert_to_tensor(y_pred, dtype=self.dtype)
            return self.call(tf.convert_to_tensor(y_true), y_pred)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin, distance_metric=_serialize_metric(self.distance_metric))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _TripletLoss:
        config = dict(config)
        if "distance_metric" in config:
            config["distance_metric"] = _deserialize_metric(config["distance_metric"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class TripletSemiHardLoss(_TripletLoss):
    """Keras loss wrapping `triplet_semihard_loss` (tfa `TripletSemiHardLoss`).

    Args:
        margin: margin added to d_ap - d_an.
        distance_metric: "L2", "squared-L2", "angular", or a (registered, for saving) callable.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar, so the default leaves it unchanged.
        dtype: dtype the inputs are converted to by `__call__` (default: Keras floatx).
    """

    def __init__(self, margin: float = 1.0, distance_metric: DistanceMetric = "L2",
                 name: str | None = "triplet_semihard_loss", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = None) -> None:
        super().__init__(margin=margin, distance_metric=distance_metric, name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return triplet_semihard_loss(y_true, y_pred, margin=self.margin, distance_metric=self.distance_metric)


@keras.saving.register_keras_serializable(package="tf_retrieval")
class TripletHardLoss(_TripletLoss):
    """Keras loss wrapping `triplet_hard_loss` (tfa `TripletHardLoss`).

    Args:
        margin: margin added to d_ap - d_an (ignored when `soft`).
        soft: use softplus(d_ap - d_an) instead of relu(d_ap - d_an + margin).
        distance_metric: "L2", "squared-L2", "angular", or a (registered, for saving) callable.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar, so the default leaves it unchanged.
        dtype: dtype the inputs are converted to by `__call__` (default: Keras floatx).
    """

    def __init__(self, margin: float = 1.0, soft: bool = False, distance_metric: DistanceMetric = "L2",
                 name: str | None = "triplet_hard_loss", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = None) -> None:
        super().__init__(margin=margin, distance_metric=distance_metric, name=name, reduction=reduction, dtype=dtype)
        self.soft = bool(soft)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return triplet_hard_loss(y_true, y_pred, margin=self.margin, soft=self.soft,
                                 distance_metric=self.distance_metric)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["soft"] = self.soft
        return config


@keras.saving.register_keras_serializable(package="tf_retrieval")
class TripletBatchAllLoss(_TripletLoss):
    """Keras loss wrapping `triplet_batch_all_loss`.

    Args:
        margin: margin added to d_ap - d_an.
        distance_metric: "L2", "squared-L2", "angular", or a (registered, for saving) callable.
        average: "positive" (mean over triplets with a loss > 0) or "all" (mean over all valid triplets).
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar, so the default leaves it unchanged.
        dtype: dtype the inputs are converted to by `__call__` (default: Keras floatx).

    Raises:
        ValueError: unknown `average` or `distance_metric`.
    """

    def __init__(self, margin: float = 1.0, distance_metric: DistanceMetric = "L2", average: str = "positive",
                 name: str | None = "triplet_batch_all_loss", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = None) -> None:
        if average not in AVERAGES:
            raise InvalidInputError(f"average must be one of {AVERAGES}, got {average!r}")
        super().__init__(margin=margin, distance_metric=distance_metric, name=name, reduction=reduction, dtype=dtype)
        self.average = average

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return triplet_batch_all_loss(y_true, y_pred, margin=self.margin, distance_metric=self.distance_metric,
                                      average=self.average)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["average"] = self.average
        return config


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

_NAMES: dict[str, type[_TripletLoss]] = {
    "semi-hard": TripletSemiHardLoss, "semihard": TripletSemiHardLoss,
    "hard": TripletHardLoss, "batch-hard": TripletHardLoss,
    "batch-all": TripletBatchAllLoss, "all": TripletBatchAllLoss,
}
_CLASSES: dict[str, type[_TripletLoss]] = {cls.__name__: cls for cls in
                                           (TripletSemiHardLoss, TripletHardLoss, TripletBatchAllLoss)}


def get(identifier: str | dict[str, Any] | keras.losses.Loss) -> keras.losses.Loss:
    """Resolves a triplet loss from a short name, a config dict or an instance.

    Args:
        identifier: a name ("semi-hard"/"semihard", "hard"/"batch-hard", "batch-all"/"all"; case, "_" and "-" do not
            matter), a dict `{"class_name": <name or class name>, "config": {...}}` (as written by
            `keras.saving.serialize_keras_object`), or a `keras.losses.Loss` instance (returned as is).

    Returns:
        The loss instance.

    Raises:
        ValueError: unknown name or malformed identifier.
    """
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        return _lookup(identifier)()
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise InvalidInputError(f"a loss config dict needs a 'class_name' key (and optionally 'config'), got keys "
                             f"{sorted(identifier)}")
        cls = _lookup(identifier["class_name"])
        return cls.from_config(dict(identifier.get("config") or {}))
    raise InvalidInputError(f"cannot build a triplet loss from {identifier!r} (type {type(identifier).__name__}); pass a name "
                     f"such as 'semi-hard', a config dict or a keras.losses.Loss instance")


def _lookup(name: str) -> type[_TripletLoss]:
    if name in _CLASSES:
        return _CLASSES[name]
    key = name.strip().lower().replace("_", "-")
    if key.startswith("triplet-"):
        key = key[len("triplet-"):]
    if key.endswith("-loss"):
        key = key[:-len("-loss")]
    if key not in _NAMES:
        raise InvalidInputError(f"unknown triplet loss {name!r}; use one of {sorted(_NAMES)} or a class name "
                         f"{sorted(_CLASSES)}")
    return _NAMES[key]
