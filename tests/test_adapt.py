"""Whitening and fusion of a model's vectors (`tfr adapt`)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import make_image_folder
from tf_retrieval.config import ModelConfig, TrainConfig
from tf_retrieval.data.images import load_dataset
from tf_retrieval.data.protocols import Protocol
from tf_retrieval.training.adapt import (HEAD_WEIGHTS, adapt, adaptation_details, build_adapted_head,
                                         choose_head_weight, choose_whitening, fit_whitening, frozen_vectors,
                                         fused_vectors)
from tf_retrieval.vectors import l2_normalize

SMALL = dict(backbone="mobilenet_v2", image_size=32, weights=None)


def test_whitening_decorrelates_and_evens_out_the_kept_axes(rng):
    x = rng.normal(size=(500, 6)) * np.array([30.0, 10.0, 3.0, 1.0, 0.5, 0.1]) + 50.0
    mean, projection = fit_whitening(x, dim=4, shrinkage=0.0)
    assert mean.shape == (6,) and projection.shape == (6, 4)
    centred = l2_normalize(x) - mean
    np.testing.assert_allclose(np.cov(centred @ projection, rowvar=False), np.eye(4), atol=1e-3)
    shrunk = fit_whitening(x, dim=4, shrinkage=1.0)[1]
    variances = np.var(centred @ shrunk, axis=0)
    assert (variances < 1).all() and variances[0] > variances[-1]  # small axes are damped, not blown up
    assert fit_whitening(x[:3], dim=10)[1].shape == (6, 2)  # at most n - 1 axes
    with pytest.raises(ValueError, match="whitening needs at least 2 vectors"):
        fit_whitening(x[:1])


def test_the_adapted_head_computes_the_weighted_fusion(rng):
    import keras

    features = rng.normal(size=(20, 6)).astype(np.float32)
    whitening = fit_whitening(features, dim=3)
    inputs = keras.Input((6,))
    head = keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(2)(inputs)))
    head_vectors = np.asarray(head(features))
    for frozen_whitening in (whitening, None):
        frozen = frozen_vectors(features, frozen_whitening)
        assert frozen.shape[1] == (3 if frozen_whitening else 6)
        for weight in (0.0, 0.3, 1.0):
            out = np.asarray(build_adapted_head(6, frozen_whitening, head, weight)(features))
            np.testing.assert_allclose(out, fused_vectors(frozen, head_vectors, weight), atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        # the fused ranking is the weighted sum of the two cosines
        out = np.asarray(build_adapted_head(6, frozen_whitening, head, 0.3)(features))
        np.testing.assert_allclose(out @ out.T, 0.7 * frozen @ frozen.T + 0.3 * head_vectors @ head_vectors.T,
                                   atol=1e-5)
    with pytest.raises(ValueError, match=r"head_weight must be in \[0, 1\], got 1.5"):
        build_adapted_head(6, whitening, head, 1.5)


def test_the_choices_follow_leave_one_out_map_at_r(rng):
    # two classes that differ along the direction of largest variance: whitening evens it out and loses them
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 8)) * 0.3 + 1.0
    features[:, 0] += np.where(labels == 0, 4.0, -4.0)
    branch, scores = choose_whitening(features, labels, dims=(4, 8), shrinkages=(0.0, 1.0))
    assert branch is None and scores["raw"] == max(scores.values()) > scores["whitened 8-d s=0"]
    assert len(scores) == 5
    # many classes, each a small offset along its own axis, under a large shared nuisance: whitening wins
    labels = np.repeat(np.arange(6), 10)
    features = np.eye(6)[labels] * 0.5 + rng.normal(size=(60, 6)) * 0.1
    features[:, 0] += rng.normal(size=60) * 10
    branch, scores = choose_whitening(features, labels, whiten=None, dims=(6,), shrinkages=(0.0,))
    assert branch == (6, 0.0) and scores["whitened 6-d s=0"] > scores["raw"]
    assert choose_whitening(features, labels, whiten=True, dims=(6,), shrinkages=(0.0,))[1].keys() == {"whitened 6-d s=0"}

    perfect_head = np.eye(6)[labels]  # a head that separates the classes gets the weight; ties go to the smaller one
    weight, weights = choose_head_weight(l2_normalize(rng.normal(size=(60, 8))), perfect_head, labels)
    assert weight >= 0.5 and weights[f"w={weight:g}"] == 1.0 == max(weights.values())
    assert all(v < 1.0 for w, v in weights.items() if float(w[2:]) < weight) and len(weights) == len(HEAD_WEIGHTS)


def test_adapt_a_training_run_on_unseen_classes(tmp_path):
    from tf_retrieval.features.embedding import backbone_features, embed_collection
    from tf_retrieval.models.heads import load_head
    from tf_retrieval.training.train import train

    folder = make_image_folder(tmp_path / "images", classes=("red", "green", "blue", "yellow", "purple", "grey"),
                               per_class=6, size=(32, 32))
    collection = load_dataset(folder)
    labels = collection.labels
    protocol = Protocol("flowers-disjoint", collection, train=np.flatnonzero(labels < 4),
                        database=np.flatnonzero(labels >= 4), queries=None)
    assert protocol.class_disjoint
    workdir = str(tmp_path / "work")
    features = backbone_features(collection, ModelConfig(**SMALL), workdir=workdir, runtime="tf", progress=False)
    config = TrainConfig(model=ModelConfig(name="finetuned", **SMALL), embedding_dim=4, hidden_dim=8, epochs=1,
                         steps_per_epoch=2, classes_per_batch=3, images_per_class=3, validation_fraction=0.5)
    run = str(tmp_path / "run")
    result = train(config, run, protocol=protocol, inputs=features, verbose=0)

    out = str(tmp_path / "adapted")
    adapted = adapt(result.model_config, protocol, out, dim=8, run_dir=run, workdir=workdir, runtime="tf")
    details = json.load(open(os.path.join(out, "adapt.json")))
    choices = details["choices"]
    branches, weights = choices["frozen_branch_map_at_r"], choices["head_weight_map_at_r"]
    assert branches.keys() == {"raw", "whitened 8-d s=1", "whitened 8-d s=10"}
    assert weights[f"w={details['head_weight']:g}"] == max(weights.values()) and len(weights) == len(HEAD_WEIGHTS)
    assert choices["validation"]["classes"] == 2  # whole training classes held out, as the run validated
    whitened = max(branches, key=branches.get) != "raw"
    assert details["whiten_dim"] == (8 if whitened else None)
    assert (details["fitted_on"] is None) != whitened and (not whitened or "they are the queries" in details["fitted_on"])
    assert adapted.head.startswith(out) and adapted.image_size == 32

    # the adapted model embeds through the ordinary path, and computes whitening fitted on the database + fusion
    vectors = embed_collection(collection, adapted, workdir=workdir, runtime="tf", progress=False)
    head_vectors = l2_normalize(load_head(result.model_config.head).predict(features, verbose=0))
    frozen = frozen_vectors(features, fit_whitening(features[protocol.database], 8, details["shrinkage"])
                            if whitened else None)
    np.testing.assert_allclose(vectors, fused_vectors(frozen, head_vectors, details["head_weight"]), atol=1e-4)
    record_fields = adaptation_details(os.path.join(out, "model.json"))
    assert record_fields["run_dir"] == os.path.abspath(run)
    assert record_fields["adaptation"]["whiten_dim"] == details["whiten_dim"]
    assert adaptation_details(os.path.join(run, "model.json")) == {}

    # a baseline: the whitened features alone, fitted on the database, named as such in records
    baseline_dir = str(tmp_path / "whitened")
    whitened_config = adapt(ModelConfig(**SMALL), protocol, baseline_dir, whiten=True, dim=8, shrinkage=1.0,
                            workdir=workdir, runtime="tf")
    np.testing.assert_allclose(embed_collection(collection, whitened_config, workdir=workdir, runtime="tf",
                                                progress=False),
                               frozen_vectors(features, fit_whitening(features[protocol.database], 8, 1.0)), atol=1e-4)
    assert adaptation_details(os.path.join(baseline_dir, "model.json"))["variant"] == "whitened"
    assert adaptation_details(os.path.join(baseline_dir, "model.json"))["model"] == "baseline"
    assert record_fields["model"] == ("finetuned" if details["head_weight"] > 0 else "baseline")  # w 0: no head

    with pytest.raises(ValueError, match="choosing the head weight needs the training run"):
        adapt(result.model_config, protocol, str(tmp_path / "x"), workdir=workdir, runtime="tf")
    with pytest.raises(ValueError, match="adapt takes float models with a frozen backbone"):
        adapt(ModelConfig(hash_bits=16, **SMALL), protocol, str(tmp_path / "y"), workdir=workdir, runtime="tf")
    all_in = str(tmp_path / "all-in")  # a run that held out no validation split has none to choose the weight on
    train(dataclasses.replace(config, validation_fraction=0.0), all_in, protocol=protocol, inputs=features, verbose=0)
    with pytest.raises(ValueError, match="trained on every training image .* give --head-weight"):
        adapt(result.model_config, protocol, str(tmp_path / "z"), dim=8, run_dir=all_in, workdir=workdir,
              runtime="tf")
