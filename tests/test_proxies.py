"""Proxy losses against numpy references written from the papers' formulas."""
import numpy as np
import pytest
import tensorflow as tf

from tf_retrieval.training.proxies import ClassProxies, cosface_loss, proxy_anchor_loss, proxy_loss


def cosines_and_labels(rng, n=12, classes=4):
    labels = rng.integers(0, classes - 1, size=n)  # the last class has no image in the batch
    cosines = np.tanh(rng.normal(size=(n, classes)))
    return cosines.astype(np.float32), labels


def test_cosface_matches_the_numpy_formula(rng):
    cosines, labels = cosines_and_labels(rng)
    scale, margin, smoothing = 16.0, 0.1, 0.1
    expected = 0.0
    for cos, y in zip(cosines.astype(np.float64), labels):
        logits = scale * (cos - margin * (np.arange(len(cos)) == y))
        log_probs = logits - np.log(np.exp(logits).sum())
        targets = np.full(len(cos), smoothing / len(cos))
        targets[y] += 1 - smoothing
        expected -= (targets * log_probs).sum() / len(labels)
    got = float(cosface_loss(tf.constant(labels), tf.constant(cosines), scale, margin, smoothing))
    assert got == pytest.approx(expected, rel=1e-5)


def test_proxy_anchor_matches_a_brute_force_loop(rng):
    cosines, labels = cosines_and_labels(rng)
    alpha, delta = 32.0, 0.1
    classes = cosines.shape[1]
    pulls = [np.log1p(sum(np.exp(-alpha * (cosines[i, p] - delta)) for i in range(len(labels)) if labels[i] == p))
             for p in range(classes) if (labels == p).any()]
    pushes = [np.log1p(sum(np.exp(alpha * (cosines[i, p] + delta)) for i in range(len(labels)) if labels[i] != p))
              for p in range(classes)]
    expected = np.mean(pulls) + np.mean(pushes)
    got = float(proxy_anchor_loss(tf.constant(labels), tf.constant(cosines), alpha, delta))
    assert got == pytest.approx(expected, rel=1e-4)
    # a proxy that sits on its class and away from the others costs less than a shuffled one
    good = np.where(np.arange(classes)[None] == labels[:, None], 0.9, -0.5).astype(np.float32)
    bad = np.where(np.arange(classes)[None] == (labels[:, None] + 1) % classes, 0.9, -0.5).astype(np.float32)
    assert float(proxy_anchor_loss(labels, tf.constant(good))) < float(proxy_anchor_loss(labels, tf.constant(bad)))


def test_class_proxies_give_cosines_with_unit_proxies(rng):
    layer = ClassProxies(3)
    x = rng.normal(size=(5, 4)).astype(np.float32) * 7
    cosines = np.asarray(layer(x))
    proxies = np.asarray(layer.proxies)
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (proxies / np.linalg.norm(proxies, axis=0))
    np.testing.assert_allclose(cosines, expected, atol=1e-5)
    assert cosines.shape == (5, 3) and np.abs(cosines).max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="at least 2 training classes"):
        ClassProxies(1)
    with pytest.raises(ValueError, match="unknown proxy loss 'arcface'; choose one of cosface, proxy-anchor"):
        proxy_loss("arcface")
