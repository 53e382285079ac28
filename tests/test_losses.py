import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_retrieval.training import losses
from tf_retrieval.training.losses import (TripletBatchAllLoss, TripletHardLoss, TripletSemiHardLoss, angular_distance,
                                 pairwise_distance, triplet_batch_all_loss, triplet_hard_loss, triplet_semihard_loss)


# ----------------------------------------------------------------------------------------------------------------------
# Slow numpy reference: explicit loops over (anchor, positive, negative), rules taken from their definitions.
# ----------------------------------------------------------------------------------------------------------------------

def ref_distances(x, metric):
    x = np.asarray(x, np.float64)
    if metric == "L1":
        return np.abs(x[:, None, :] - x[None, :, :]).sum(-1)
    if metric in ("L2", "squared-L2"):
        squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return squared if metric == "squared-L2" else np.sqrt(squared)
    assert metric == "angular"
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.maximum(1.0 - unit @ unit.T, 1e-16)


def _positives(labels, a):
    return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def _negatives(labels, a):
    return [n for n in range(len(labels)) if labels[n] != labels[a]]


def ref_semihard(labels, d, margin):
    """Mean over positive pairs (a, p) of max(d_ap - d_an + margin, 0), where d_an is the smallest negative distance
    strictly greater than d_ap, else the largest negative distance, else (no negative at all) min(d[a]) as in tfa."""
    total, pairs = 0.0, 0
    for a in range(len(labels)):
        negatives = _negatives(labels, a)
        for p in _positives(labels, a):
            pairs += 1
            farther = [d[a, n] for n in negatives if d[a, n] > d[a, p]]
            if farther:
                d_an = min(farther)
            elif negatives:
                d_an = max(d[a, n] for n in negatives)
            else:
                d_an = d[a].min()
            total += max(d[a, p] - d_an + margin, 0.0)
    return total / pairs if pairs else 0.0


def ref_hard(labels, d, margin, soft=False):
    """Mean over anchors of the farthest positive vs the closest negative (tfa fallbacks: no positive -> min(d[a]),
    no negative -> max(d[a]))."""
    per_anchor = []
    for a in range(len(labels)):
        positives, negatives = _positives(labels, a), _negatives(labels, a)
        d_ap = max(d[a, p] for p in positives) if positives else d[a].min()
        d_an = min(d[a, n] for n in negatives) if negatives else d[a].max()
        per_anchor.append(np.log(1.0 + np.exp(d_ap - d_an)) if soft else max(d_ap - d_an + margin, 0.0))
    return float(np.mean(per_anchor))


def ref_batch_all(labels, d, margin, average="positive"):
    """Every valid triplet's max(d_ap - d_an + margin, 0), averaged over the positive ones or over all of them."""
    values = [max(d[a, p] - d[a, n] + margin, 0.0)
              for a in range(len(labels)) for p in _positives(labels, a) for n in _negatives(labels, a)]
    count = sum(v > 0 for v in values) if average == "positive" else len(values)
    return sum(values) / count if count else 0.0


def make_batches():
    rng = np.random.default_rng(0)
    balanced = np.repeat(np.arange(4), 3)                         # P=4 classes x K=3
    with_singleton = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4])  # class 3 has one image
    random = rng.integers(0, 3, size=10)
    batches = []
    for labels in (balanced, with_singleton, random):
        x = rng.normal(size=(len(labels), 5)).astype(np.float32)
        batches.append((labels.astype(np.int32), x))
    # L2-normalised embeddings, as the head produces them.
    x = rng.normal(size=(12, 4)).astype(np.float32)
    batches.append((balanced.astype(np.int32), x / np.linalg.norm(x, axis=1, keepdims=True)))
    return batches


BATCHES = make_batches()
MARGINS = (0.1, 0.5, 1.0, 2.0)


def l1_distance(embeddings):
    return tf.reduce_sum(tf.abs(embeddings[:, tf.newaxis, :] - embeddings[tf.newaxis, :, :]), axis=-1)


def _metric_arg(metric):
    return l1_distance if metric == "L1" else metric


# ----------------------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------------------

def test_pairwise_distance_matches_numpy():
    _, x = BATCHES[0]
    np.testing.assert_allclose(pairwise_distance(x).numpy(), ref_distances(x, "L2"), atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(x, squared=True).numpy(), ref_distances(x, "squared-L2"), atol=1e-4)
    np.testing.assert_allclose(angular_distance(x).numpy(), ref_distances(x, "angular"), atol=1e-5)
    d = pairwise_distance(np.vstack([x, x[:2]])).numpy()
    assert np.all(np.diag(d) == 0) and np.all(d >= 0)
    assert d[0, len(x)] == 0.0 and d[1, len(x) + 1] == 0.0   # duplicated rows: exactly 0, not sqrt(rounding noise)


def test_angular_distance_ignores_scale_and_is_clamped():
    x = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], np.float32)
    d = angular_distance(x).numpy()
    np.testing.assert_allclose(d[0], [1e-16, 1e-16, 1.0, 2.0], atol=1e-6)
    assert d.min() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Every variant against the reference
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular", "L1"])
def test_semihard_matches_reference(metric):
    for (labels, x), margin in itertools.product(BATCHES, MARGINS):
        expected = ref_semihard(labels, ref_distances(x, metric), margin)
        got = triplet_semihard_loss(labels, x, margin=margin, distance_metric=_metric_arg(metric)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{metric} margin={margin} labels={labels}")


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular", "L1"])
@pytest.mark.parametrize("soft", [False, True])
def test_hard_matches_reference(metric, soft):
    for (labels, x), margin in itertools.product(BATCHES, MARGINS):
        expected = ref_hard(labels, ref_distances(x, metric), margin, soft=soft)
        got = triplet_hard_loss(labels, x, margin=margin, soft=soft, distance_metric=_metric_arg(metric)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{metric} margin={margin} labels={labels}")


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular", "L1"])
@pytest.mark.parametrize("average", ["positive", "all"])
def test_batch_all_matches_reference(metric, average):
    for (labels, x), margin in itertools.product(BATCHES, MARGINS):
        expected = ref_batch_all(labels, ref_distances(x, metric), margin, average=average)
        got = triplet_batch_all_loss(labels, x, margin=margin, distance_metric=_metric_arg(metric),
                                     average=average).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{metric} margin={margin} labels={labels}")


def test_batch_all_positive_average_is_at_least_all_average():
    labels, x = BATCHES[0]
    positive = triplet_batch_all_loss(labels, x, margin=0.5).numpy()
    everything = triplet_batch_all_loss(labels, x, margin=0.5, average="all").numpy()
    assert positive > everything > 0


# ----------------------------------------------------------------------------------------------------------------------
# Edge cases, worked out by hand (1-D embeddings, L2 distance = |x_i - x_j|)
# ----------------------------------------------------------------------------------------------------------------------

def _1d(values):
    return np.array(values, np.float32)[:, None]


def test_one_class_only_no_negatives():
    labels, x = np.zeros(3, np.int32), _1d([0, 1, 3])
    # Positive distances 1, 3, 2 (each pair twice): mean 2. Semi-hard: no negative -> d_an = row minimum = d(a, a) = 0,
    # so loss = margin + mean d_ap = 1 + 2.
    assert triplet_semihard_loss(labels, x).numpy() == pytest.approx(3.0, abs=1e-6)
    # Hard: no negative -> d_an = row maximum = the farthest positive, so every anchor gives exactly the margin.
    assert triplet_hard_loss(labels, x, margin=0.3).numpy() == pytest.approx(0.3, abs=1e-6)
    # Batch-all: no valid triplet at all -> 0 (not NaN).
    assert triplet_batch_all_loss(labels, x).numpy() == 0.0
    assert triplet_batch_all_loss(labels, x, average="all").numpy() == 0.0


def test_single_image_class_has_no_positive():
    labels, x = np.array([0, 0, 1], np.int32), _1d([0, 1, 5])
    # Semi-hard, margin 5: (0,1): d_ap 1, d_an 5 -> 1;  (1,0): d_ap 1, d_an 4 -> 2;  anchor 2 has no pair. Mean 1.5.
    assert triplet_semihard_loss(labels, x, margin=5.0).numpy() == pytest.approx(1.5, abs=1e-6)
    assert triplet_semihard_loss(labels, x, margin=1.0).numpy() == pytest.approx(0.0, abs=1e-6)
    # Hard, margin 5: anchor 0: 1 - 5 + 5 = 1; anchor 1: 1 - 4 + 5 = 2; anchor 2: no positive -> d_ap = 0,
    # d_an = 4 -> 1. Mean 4/3.
    assert triplet_hard_loss(labels, x, margin=5.0).numpy() == pytest.approx(4 / 3, abs=1e-6)
    # Only singletons: no positive pair anywhere -> 0 (tfa would give NaN).
    assert triplet_semihard_loss(np.arange(3), x).numpy() == 0.0
    assert triplet_batch_all_loss(np.arange(3), x).numpy() == 0.0


def test_no_semihard_negative_falls_back_to_largest_negative():
    labels, x = np.array([0, 0, 1, 1], np.int32), _1d([0, 3, 1, 2])
    # (0,1): d_ap 3; negatives at 1, 2: none farther than 3 -> largest, 2 -> 1 + 3 - 2 = 2
    # (1,0): d_ap 3; negatives at 2, 1: none farther -> 2 -> 2
    # (2,3): d_ap 1; negatives at 1, 2: closest farther than 1 is 2 -> 1 + 1 - 2 = 0
    # (3,2): d_ap 1; negatives at 2, 1: -> 2 -> 0.                         Mean (2 + 2 + 0 + 0) / 4 = 1.
    assert triplet_semihard_loss(labels, x).numpy() == pytest.approx(1.0, abs=1e-6)
    assert ref_semihard(labels, ref_distances(x, "L2"), 1.0) == pytest.approx(1.0)


def test_all_equal_embeddings_give_the_margin():
    labels, x = np.array([0, 0, 1, 1, 2], np.int32), np.ones((5, 3), np.float32)
    for metric in ("L2", "squared-L2", "angular"):
        # Every distance is 0 (1e-16 for angular): d_ap - d_an = 0 whatever the mining.
        assert triplet_semihard_loss(labels, x, 0.7, metric).numpy() == pytest.approx(0.7, abs=1e-6)
        assert triplet_hard_loss(labels, x, 0.7, distance_metric=metric).numpy() == pytest.approx(0.7, abs=1e-6)
        assert triplet_batch_all_loss(labels, x, 0.7, metric).numpy() == pytest.approx(0.7, abs=1e-6)
    assert triplet_hard_loss(labels, x, soft=True).numpy() == pytest.approx(np.log(2.0), abs=1e-6)


def test_perfect_batch_has_zero_loss():
    labels, x = np.array([0, 0, 1, 1, 2, 2], np.int32), _1d([0, 0.1, 10, 10.1, 20, 20.1])
    # Positives 0.1 apart, negatives >= 9.9 apart: d_ap - d_an + 0.5 < 0 for every triplet.
    for fn in (triplet_semihard_loss, triplet_hard_loss, triplet_batch_all_loss):
        assert fn(labels, x, margin=0.5).numpy() == 0.0
    # Soft margin never reaches 0: d_ap = 0.1 everywhere; the closest negative is 10 for the end points (anchors 0, 5)
    # and 9.9 for the four inner ones -> (2 softplus(-9.9) + 4 softplus(-9.8)) / 6.
    expected = (2 * np.log1p(np.exp(-9.9)) + 4 * np.log1p(np.exp(-9.8))) / 6
    assert triplet_hard_loss(labels, x, soft=True).numpy() == pytest.approx(expected, rel=1e-3)


def test_all_wrong_batch_by_hand():
    # Every point sits on top of a negative and 2 away from its positive:
    #   x = [0, 0, 2, 2], labels = [0, 1, 0, 1]  ->  d_ap = 2 for every anchor, negatives at 0 and 2.
    labels, x = np.array([0, 1, 0, 1], np.int32), _1d([0, 0, 2, 2])
    # Hard: farthest positive 2, closest negative 0 -> 2 - 0 + 1 = 3 for every anchor.
    assert triplet_hard_loss(labels, x).numpy() == pytest.approx(3.0, abs=1e-6)
    # Soft hard: softplus(2 - 0) = log(1 + e^2) = 2.126928.
    assert triplet_hard_loss(labels, x, soft=True).numpy() == pytest.approx(np.log1p(np.exp(2.0)), abs=1e-6)
    # Semi-hard: no negative farther than 2 (strictly) -> largest negative, 2 -> 2 - 2 + 1 = 1 for every pair.
    assert triplet_semihard_loss(labels, x).numpy() == pytest.approx(1.0, abs=1e-6)
    # Batch-all: per (a, p) the triplets give 2 - 0 + 1 = 3 and 2 - 2 + 1 = 1, all positive -> mean 2.
    assert triplet_batch_all_loss(labels, x).numpy() == pytest.approx(2.0, abs=1e-6)
    assert triplet_batch_all_loss(labels, x, average="all").numpy() == pytest.approx(2.0, abs=1e-6)
    # Squared L2: d_ap = 4 -> hard 5, semi-hard 1, batch-all (5 + 1) / 2 = 3.
    assert triplet_hard_loss(labels, x, distance_metric="squared-L2").numpy() == pytest.approx(5.0, abs=1e-5)
    assert triplet_semihard_loss(labels, x, distance_metric="squared-L2").numpy() == pytest.approx(1.0, abs=1e-5)
    assert triplet_batch_all_loss(labels, x, distance_metric="squared-L2").numpy() == pytest.approx(3.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, graph mode, gradients
# ----------------------------------------------------------------------------------------------------------------------

ALL_LOSSES = [
    lambda y, e, m: triplet_semihard_loss(y, e, distance_metric=m),
    lambda y, e, m: triplet_hard_loss(y, e, distance_metric=m),
    lambda y, e, m: triplet_hard_loss(y, e, soft=True, distance_metric=m),
    lambda y, e, m: triplet_batch_all_loss(y, e, distance_metric=m),
    lambda y, e, m: triplet_batch_all_loss(y, e, distance_metric=m, average="all"),
]


def test_labels_column_vector_and_tf_function_give_the_eager_value():
    labels, x = BATCHES[1]
    # Graph mode with an unknown batch size (as inside model.fit with a partial last batch).
    spec = (tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32))
    for eager in (triplet_semihard_loss, triplet_hard_loss, triplet_batch_all_loss):
        expected = eager(labels, x).numpy()
        assert eager(labels[:, None], x).numpy() == pytest.approx(expected, abs=1e-6)
        assert eager(labels.astype(np.int64), x).numpy() == pytest.approx(expected, abs=1e-6)
        graph = tf.function(eager, input_signature=spec)
        assert graph(labels, x).numpy() == pytest.approx(expected, abs=1e-6)


def test_float16_embeddings_are_computed_in_float32():
    labels, x = BATCHES[3]
    for fn in ALL_LOSSES:
        for metric in ("L2", "angular"):
            half = fn(labels, tf.constant(x, tf.float16), metric)
            assert half.dtype == tf.float16
            full = fn(labels, tf.cast(tf.constant(x, tf.float16), tf.float32), metric)
            assert float(half) == pytest.approx(float(full), abs=2e-3)
    assert pairwise_distance(tf.constant(x, tf.float16)).dtype == tf.float16
    for loss_class in (TripletSemiHardLoss, TripletHardLoss, TripletBatchAllLoss):  # the Keras losses too
        half = loss_class(0.2)(labels, tf.constant(x, tf.float16))  # (refused float16 before)
        full = loss_class(0.2)(labels, tf.cast(tf.constant(x, tf.float16), tf.float32))
        assert float(half) == pytest.approx(float(full), abs=2e-3)


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
def test_gradients_are_finite(metric):
    labels = np.array([0, 0, 1, 1, 2, 2, 3], np.int32)
    rng = np.random.default_rng(1)
    random = rng.normal(size=(7, 4)).astype(np.float32)
    duplicated = np.vstack([random[:3], random[:3], random[:1]])   # zero distances, where sqrt has an infinite slope
    for x in (random, duplicated, np.ones((7, 4), np.float32)):
        for fn in ALL_LOSSES:
            embeddings = tf.Variable(x)
            with tf.GradientTape() as tape:
                loss = fn(labels, embeddings, metric)
            grad = tape.gradient(loss, embeddings)
            assert grad is not None and np.all(np.isfinite(grad.numpy())), (metric, x[:2])
    with tf.GradientTape() as tape:
        embeddings = tf.Variable(random)
        loss = triplet_semihard_loss(labels, embeddings, distance_metric=metric)
    assert np.abs(tape.gradient(loss, embeddings).numpy()).sum() > 0


def test_invalid_inputs_raise_clear_errors():
    labels, x = BATCHES[0]
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        triplet_hard_loss(labels, x[:, :, None])
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, 1\]"):
        triplet_hard_loss(np.eye(len(labels), 3), x)
    with pytest.raises(ValueError, match="got 5 labels for 12 embeddings"):
        triplet_semihard_loss(labels[:5], x)
    with pytest.raises(ValueError, match="distance_metric must be one of"):
        triplet_semihard_loss(labels, x, distance_metric="cosine")
    with pytest.raises(ValueError, match="distance_metric must be one of"):
        TripletHardLoss(distance_metric="L_2")
    with pytest.raises(ValueError, match="average must be one of"):
        triplet_batch_all_loss(labels, x, average="mean")
    with pytest.raises(ValueError, match="average must be one of"):
        TripletBatchAllLoss(average="mean")
    with pytest.raises(ValueError, match="must be floating point"):
        pairwise_distance(np.ones((3, 2), np.int32))


# ----------------------------------------------------------------------------------------------------------------------
# Keras classes, config, registry
# ----------------------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="test_losses")
def manhattan(embeddings):
    return l1_distance(embeddings)


def test_loss_classes_match_functions_and_round_trip_config():
    labels, x = BATCHES[1]
    cases = [
        (TripletSemiHardLoss(margin=0.4, distance_metric="angular"),
         triplet_semihard_loss(labels, x, 0.4, "angular")),
        (TripletHardLoss(margin=0.3, soft=True, distance_metric="squared-L2"),
         triplet_hard_loss(labels, x, 0.3, True, "squared-L2")),
        (TripletBatchAllLoss(margin=0.2, average="all"), triplet_batch_all_loss(labels, x, 0.2, average="all")),
        (TripletSemiHardLoss(margin=0.5, distance_metric=manhattan), triplet_semihard_loss(labels, x, 0.5, manhattan)),
    ]
    for loss, expected in cases:
        assert float(loss(labels, x)) == pytest.approx(float(expected), abs=1e-6)
        clone = type(loss).from_config(loss.get_config())
        assert clone.get_config() == loss.get_config()
        assert float(clone(labels, x)) == pytest.approx(float(expected), abs=1e-6)
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
        assert float(losses.get(keras.saving.serialize_keras_object(loss))(labels, x)) == pytest.approx(
            float(expected), abs=1e-6)
    assert cases[1][0].get_config()["soft"] is True
    assert cases[2][0].get_config()["average"] == "all"
    assert cases[3][0].get_config()["distance_metric"] != "L2"


def test_loss_classes_keep_large_labels_apart():
    x = np.array([[0, 0], [0, 1], [3, 0], [3, 1]], np.float32)
    for labels in (np.array([256, 256, 257, 257]), np.array([2**24, 2**24, 2**24 + 1, 2**24 + 1])):
        expected = float(triplet_hard_loss(labels, x, 0.5))  # two classes 3 apart: no loss
        assert expected == 0.0
        assert float(TripletHardLoss(0.5)(labels, x)) == expected  # float32 would merge 2**24 and 2**24 + 1
        assert float(TripletHardLoss(0.5, dtype="bfloat16")(labels, x)) == expected  # bfloat16: 256 and 257
    with pytest.raises(ValueError, match="take no sample_weight"):
        TripletHardLoss(0.5)(labels, x, sample_weight=np.ones(4))


def test_get_resolves_names_dicts_and_instances():
    for name in ("semi-hard", "semihard", "Semi_Hard", "triplet_semihard_loss", "TripletSemiHardLoss"):
        assert type(losses.get(name)) is TripletSemiHardLoss
    for name in ("hard", "batch-hard", "batch_hard"):
        assert type(losses.get(name)) is TripletHardLoss
    for name in ("batch-all", "all", "batch_all"):
        assert type(losses.get(name)) is TripletBatchAllLoss
    loss = losses.get({"class_name": "hard", "config": {"margin": 0.25, "soft": True}})
    assert isinstance(loss, TripletHardLoss) and loss.margin == 0.25 and loss.soft
    instance = TripletBatchAllLoss()
    assert losses.get(instance) is instance
    with pytest.raises(ValueError, match="unknown triplet loss 'contrastive'"):
        losses.get("contrastive")
    with pytest.raises(ValueError, match="'class_name'"):
        losses.get({"margin": 1.0})
    with pytest.raises(ValueError, match="cannot build a triplet loss"):
        losses.get(3)


def _separable_data():
    """3 classes: 2 informative dims (class means on a triangle) + 4 noisy dims that the model must learn to ignore."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10).astype(np.int32)
    means = np.array([[0.0, 1.0], [0.87, -0.5], [-0.87, -0.5]])
    signal = means[labels] + rng.normal(0, 0.05, size=(30, 2))
    noise = rng.normal(0, 1.0, size=(30, 4))
    return np.hstack([signal, noise]).astype(np.float32), labels


@pytest.mark.parametrize("loss", [TripletSemiHardLoss(margin=0.5), TripletHardLoss(margin=0.5),
                                  TripletBatchAllLoss(margin=0.5)], ids=["semihard", "hard", "batch-all"])
def test_model_fit_reduces_loss(loss):
    keras.utils.set_random_seed(0)
    x, labels = _separable_data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.UnitNormalization()])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    history = model.fit(x, labels, batch_size=30, epochs=25, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < 0.5 * history[0], history
