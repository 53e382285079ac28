"""Fine-tune the embedder with a triplet loss on cached backbone outputs.

Two depths, one code path:

- head only (`train_from=None`): the Siamese head trains on cached pooled features (seconds per epoch on a CPU);
- top of the backbone (`train_from="block14_add"`, ...): the backbone's activations at that layer are cached once, and
  the trunk's top blocks + pooling + head train on them (the costly bottom never runs again);
- end to end (`train_from="images"`): the whole backbone (batch norm frozen) + head train on decoded images with random
  flips and translations. Meant for a GPU; it runs on a CPU too, slowly.

Batches are class-balanced (P classes x K images) so every batch holds positives for the triplet mining. Each epoch ends
with the validation MAP@R (leave-one-out on a held-out part of the protocol's training set: whole classes when there
are many, else a stratified share of the images; or, with `validate_against="training"`, a share of every class
searching the images that train); early stopping and the best checkpoint follow it. TensorBoard logs, a
CSV history and a resumable backup live in the run directory, and the result is an ordinary `ModelConfig` (a backbone
weights file and a head file) that the embedder, the index, the export and the evaluation take unchanged.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import os
import shutil
import time
from typing import Sequence

import keras
import numpy as np

from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.config import AUGMENTATIONS, END_TO_END, STRATEGIES, ModelConfig, Recipe, TrainConfig, load_run
from tf_retrieval.data.protocols import Protocol
from tf_retrieval.storage import atomic_write, read_json_value, save_with_digest, write_json
from tf_retrieval.vectors import finish

logger = logging.getLogger(__name__)

VAL_METRIC = "val_map_at_r"


class ImageInputs:
    """Images of a collection decoded and resized on demand: the "cache" of end-to-end training.

    Indexing with positions (an array, a list or a slice) returns float32 pixels [n, s, s, 3]; `subset` keeps it lazy.
    """

    def __init__(self, collection, image_size: int, positions: np.ndarray | None = None):
        self.collection, self.image_size = collection, int(image_size)
        self.positions = np.arange(len(collection)) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.image_size, self.image_size, 3)

    def subset(self, positions) -> ImageInputs:
        return ImageInputs(self.collection, self.image_size, self.positions[positions])

    def __getitem__(self, positions) -> np.ndarray:
        from tf_retrieval.data.images import decode_image, resize_and_crop_images

        chosen = np.atleast_1d(self.positions[positions])
        return resize_and_crop_images([decode_image(self.collection.read_bytes(int(i))) for i in chosen], self.image_size)

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


class CachedViews:
    """Cached inputs of several views of every image: the plain one first, then `TrainConfig.augment`'s.

    Indexing gives the plain view (validation and shapes); `draw` gives one view of each image, chosen at random.
    """

    def __init__(self, views: list[np.ndarray]):
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.views[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.views[0].shape

    def subset(self, positions) -> CachedViews:
        return CachedViews([view[positions] for view in self.views])

    def __getitem__(self, positions) -> np.ndarray:
        return self.views[0][positions]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.views[0], dtype)

    def draw(self, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """inputs[positions], each row from a view chosen by `rng`."""
        positions = np.asarray(positions)
        chosen = rng.integers(len(self.views), size=len(positions))
        out = np.empty((len(positions), *self.shape[1:]), self.views[0].dtype)
        for v, view in enumerate(self.views):
            out[chosen == v] = view[positions[chosen == v]]
        return out


@keras.saving.register_keras_serializable(package="tf_retrieval")
class ImageView(keras.layers.Layer):
    """One `TrainConfig.augment` view of square images [n, s, s, 3]: "flip" mirrors them left-right, "zoom" scales
    their centre 7/8 back up to s x s (bilinear), "zoom-tl" / "-tr" / "-bl" / "-br" the 7/8 in a corner (a crop
    shifted by 1/16 of the side from the centre one). Runs before the frozen part whose outputs are cached."""

    ZOOM = 7 / 8

    def __init__(self, view: str, **kwargs):
        super().__init__(**kwargs)
        if view not in AUGMENTATIONS:
            raise InvalidInputError(f"unknown view {view!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.view = view

    def call(self, images):
        if self.view == "flip":
            return keras.ops.flip(images, axis=2)
        size = images.shape[1]
        crop = int(round(size * self.ZOOM))
        corner = self.view.partition("-")[2]
        top = {"": (size - crop) // 2, "t": 0, "b": size - crop}[corner[:1]]
        left = {"": (size - crop) // 2, "l": 0, "r": size - crop}[corner[1:]]
        window = images[:, top:top + crop, left:left + crop, :]
        return keras.ops.image.resize(window, (size, size), interpolation="bilinear")

    def get_config(self):
        return {**super().get_config(), "view": self.view}


def _take(inputs, positions):
    """inputs[positions], lazily for `ImageInputs` (and per view for `CachedViews`)."""
    return inputs.subset(positions) if isinstance(inputs, (ImageInputs, CachedViews)) else inputs[positions]


@dataclasses.dataclass
class TrainResult:
    """What `train` produced: the model config to embed with, and how training went."""

    model_config: ModelConfig
    run_dir: str
    best_map_at_r: float | None  # None: trained without a validation split (validation_fraction 0)
    epochs: int
    seconds: float
    history: dict[str, list[float]]

    @property
    def validation_summary(self) -> str:
        """How the run validated, for logs and `tfr train`'s last words."""
        if self.best_map_at_r is None:
            return "no validation (every training image trained; the last epoch is kept)"
        return f"best validation MAP@R {self.best_map_at_r:.4f}"


def validation_split(labels: np.ndarray, fraction: float, seed: int = 0, min_classes_for_disjoint: int = 20,
                     class_disjoint: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions 0..n-1 into (train, validation).

    Class-disjoint (`class_disjoint=True`, or by default with at least `min_classes_for_disjoint` classes): whole
    classes are held out (`fraction` of them, at least 2), like the retrieval of unseen classes; otherwise `fraction`
    of each class's images. Every validation class keeps >= 2 images.
    """
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise InvalidInputError(f"validation_fraction must be in (0, 1) to hold out a validation set, got {fraction}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if class_disjoint is None:
        class_disjoint = len(classes) >= min_classes_for_disjoint
    if class_disjoint and len(classes) < 3:
        raise InvalidInputError(f"cannot hold out whole classes from {len(classes)} classes (at least 3 are needed)")
    if class_disjoint:
        held_out = rng.choice(classes, size=max(2, int(round(fraction * len(classes)))), replace=False)
        validation = np.isin(labels, held_out)
    else:
        validation = np.zeros(len(labels), bool)
        for c in classes:
            members = np.flatnonzero(labels == c)
            count = int(round(fraction * len(members)))
            if count >= 2 and len(members) - count >= 2:
                validation[rng.choice(members, size=count, replace=False)] = True
    if validation.sum() < 2 or (~validation).sum() < 2:
        raise InvalidInputError(f"cannot hold out a validation set from {len(labels)} images of {len(classes)} classes")
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def balanced_batch(labels: np.ndarray, classes_per_batch: int, images_per_class: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Positions of one P x K batch: P random classes (all if fewer), K images of each (with replacement when a class
    has fewer than K)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise InvalidInputError("triplet training needs at least 2 classes in the training set")
    chosen = rng.choice(len(classes), size=min(classes_per_batch, len(classes)), replace=False)
    batch = []
    for c in chosen:
        members = np.flatnonzero(inverse == c)
        batch.append(rng.choice(members, size=images_per_class, replace=len(members) < images_per_class))
    return np.concatenate(batch)


def frozen_base(config: TrainConfig) -> ModelConfig:
    """The backbone training starts from: the run's base model without test-time flip (`ModelConfig.flip`, which
    training leaves to the mirrored views of `config.augment`)."""
    return dataclasses.replace(config.base_model(), flip=False)


def cache_inputs(config: TrainConfig, collection, *, workdir: str, batch_size: int = 64,
                 progress: bool = True, runtime: str = "litert") -> np.ndarray | CachedViews | ImageInputs:
    """What the trainable part reads, for every image of `collection`: pooled features (head only) or the trunk's
    activations at `config.train_from` (float16), cached under `<workdir>/features`, with the `config.augment` views
    (`CachedViews`) cached beside them; for end-to-end training, the images themselves (`ImageInputs`, decoded on
    demand). The frozen part runs in `runtime` (one of `features.litert.RUNTIMES`)."""
    from tf_retrieval.features.embedding import cached_outputs
    from tf_retrieval.models.backbones import backbone_of
    from tf_retrieval.models.heads import split_backbone

    base, train_from = frozen_base(config), config.model.train_from
    if train_from == END_TO_END:
        return ImageInputs(collection, base.image_size)
    if train_from:
        key, dtype = f"{base.backbone_key()}@{train_from}", "float16"

        def frozen():
            return split_backbone(backbone_of(base), train_from)[0]
    else:  # the cache of `features.embedding.backbone_features`
        key, dtype = base.backbone_key(), "float32"

        def frozen():
            return backbone_of(base)

    def frozen_on(view: str):
        model = frozen()
        images = keras.Input(model.input_shape[1:], name="images")
        return keras.Model(images, model(ImageView(view, name=view)(images)))

    views = [cached_outputs(collection, builder, key + suffix, image_size=base.image_size, workdir=workdir,
                            batch_size=batch_size, progress=progress, runtime=runtime, dtype=dtype,
                            weights_file=base.weights)
             for builder, suffix in [(frozen, "")] + [(functools.partial(frozen_on, view), f"+{view}")
                                                      for view in config.augment]]
    return views[0] if len(views) == 1 else CachedViews(views)


def build_trainable(config: TrainConfig, input_shape: tuple[int, ...], classes: int | None = None):
    """(trainable model: cached inputs -> unit-length embeddings, backbone, head). The backbone is None for head only.

    With `config.proxy_loss`, the model also holds `classes` learned class proxies (`GlobalBatchModel.proxies`)."""
    from tf_retrieval.models.backbones import backbone_of
    from tf_retrieval.models.heads import L2Normalize, build_head, split_backbone, trunk_of

    keras.utils.set_random_seed(config.seed)
    inputs = keras.Input(input_shape, name="inputs")
    x, backbone, train_from = inputs, None, config.model.train_from
    if train_from == END_TO_END:
        backbone = backbone_of(frozen_base(config))
        backbone.trainable = True  # recursive: then batch normalisation is frozen again (small batches)
        for layer in trunk_of(backbone).layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        x = keras.layers.RandomFlip("horizontal", seed=config.seed, name="flip")(x)
        x = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=config.seed, name="shift")(x)
        if config.randaugment:
            x = keras.layers.RandAugment(value_range=(0, 255), factor=config.randaugment, seed=config.seed,
                                         name="randaugment")(x)
        x = backbone(x)
    elif train_from:
        backbone = backbone_of(frozen_base(config))
        _, top = split_backbone(backbone, train_from)
        x = top(keras.ops.cast(x, "float32"))
    head = build_head(int(x.shape[-1]), config.embedding_dim, config.hidden_dim, config.dropout, config.model.hash_bits,
                      hashing=config.hashing)
    outputs = L2Normalize(name="unit")(head(x))  # hashing codes are compared by angle while training
    proxies = None
    if config.proxy_loss:
        from tf_retrieval.training.proxies import ClassProxies

        if classes is None:
            raise InvalidInputError("a proxy loss needs the number of training classes")
        proxies = ClassProxies(classes, name="proxies")
        proxies.build(tuple(outputs.shape))
    model = GlobalBatchModel(inputs, outputs, name=f"{config.model.name}_trainable")
    model.proxies = proxies
    return model, backbone, head


def compile_trainable(config: TrainConfig, input_shape: tuple[int, ...], classes: int | None = None):
    """`build_trainable`, compiled with the config's optimiser and losses (the triplet loss, plus its proxy term)."""
    from tf_retrieval.training import losses

    model, backbone, head = build_trainable(config, input_shape, classes)
    model.proxy_weight = float(config.proxy_weight)
    if config.proxy_loss:
        from tf_retrieval.training.proxies import proxy_loss

        model.proxy_loss = proxy_loss(config.proxy_loss)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(config)),
                  loss=losses.get({"class_name": config.mining, "config": {"margin": config.margin}}))
    if backbone is not None and config.trunk_lr_scale != 1:  # the trained trunk blocks get an Adam of their own
        own = {v.path for layer in (head, model.proxies) if layer is not None for v in layer.trainable_weights}
        model.trunk_paths = frozenset(v.path for v in model.trainable_weights if v.path not in own)
        model.trunk_optimizer = keras.optimizers.Adam(learning_rate(config, config.trunk_lr_scale))
        # both are built now, each on its own weights, so that a resumed run loads their state
        model.optimizer.build([v for v in model.trainable_weights if v.path not in model.trunk_paths])
        model.trunk_optimizer.build([v for v in model.trainable_weights if v.path in model.trunk_paths])
    return model, backbone, head


def learning_rate(config: TrainConfig, scale: float = 1.0) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Adam's learning rate: `scale` x `config.learning_rate`, constant or on the config's schedule over the run."""
    rate = scale * config.learning_rate
    if config.lr_schedule == "constant":
        return rate
    return keras.optimizers.schedules.CosineDecay(rate, decay_steps=config.epochs * config.steps_per_epoch, alpha=0.01)


class BalancedBatches(keras.utils.PyDataset):
    """P x K batches drawn from in-memory inputs: the whole schedule (`epochs` x `steps_per_epoch` batches) as one
    sequence, batch i seeded by (seed, i), so what a step trains on never depends on when Keras fetches it (it fetches
    ahead, and peeks, differently on one device and under a distribution strategy). Labels come as class indices
    (`classes` of them). Fit it with `steps_per_epoch=config.steps_per_epoch`."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, config: TrainConfig, epochs: int | None = None,
                 start_epoch: int = 0):
        super().__init__()
        # labels become class indices 0..classes-1 (what proxy losses index; the triplet loss only compares them)
        self.inputs, self.labels, self.config = inputs, np.unique(labels, return_inverse=True)[1], config
        self.epochs, self.start_epoch = epochs or config.epochs, start_epoch  # a run resumed at `start_epoch`

    @property
    def classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self):
        return (self.epochs - self.start_epoch) * self.config.steps_per_epoch

    def __getitem__(self, index):
        epoch, step = divmod(int(index), self.config.steps_per_epoch)
        rng = np.random.default_rng([self.config.seed, self.start_epoch + epoch, step])
        batch = np.sort(balanced_batch(self.labels, self.config.classes_per_batch, self.config.images_per_class, rng))
        inputs = self.inputs.draw(batch, rng) if isinstance(self.inputs, CachedViews) else self.inputs[batch]
        return np.asarray(inputs, np.float32), self.labels[batch].astype(np.int32)


class ValidationMapAtR(keras.callbacks.Callback):
    """Adds `val_map_at_r` (MAP@R of the validation set) to the epoch logs: what early stopping, the best checkpoint
    and keras-tuner follow. Each validation image queries the others (leave-one-out), or the `database` images where
    given. The outputs get the finishing of served vectors (`vectors.finish`): a hashing model is validated on its
    packed codes, by Hamming distance."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, hash_bits: int | None = None,
                 database: np.ndarray | None = None, database_labels: np.ndarray | None = None):
        super().__init__()
        self.inputs, self.labels, self.hash_bits = np.asarray(inputs, np.float32), np.asarray(labels), hash_bits
        self.database, self.database_labels = database, database_labels

    def _vectors(self, inputs, epoch: int, chunk: int = 4096) -> np.ndarray:
        """Finished outputs for `inputs` (an array, or lazy `ImageInputs` / `CachedViews`: read a chunk at a time)."""
        outputs = np.concatenate([self.model.predict(np.asarray(inputs[start:start + chunk], np.float32),
                                                     batch_size=512, verbose=0)
                                  for start in range(0, len(inputs), chunk)])
        if not np.isfinite(outputs).all():
            raise InvalidInputError(f"training diverged at epoch {epoch + 1}: the model outputs NaN or infinite values "
                             "(lower --learning-rate, or check the cached features)")
        return finish(outputs, self.hash_bits)

    def on_epoch_end(self, epoch, logs=None):
        from tf_retrieval.evaluation.evaluate import map_at_r_score

        queries, metric = self._vectors(self.inputs, epoch), "hamming" if self.hash_bits else "cosine"
        if self.database is None:  # leave-one-out
            value = map_at_r_score(queries, self.labels, metric=metric)
        else:
            value = map_at_r_score(self._vectors(self.database, epoch), self.database_labels, queries, self.labels,
                                   metric=metric)
        if logs is not None:
            logs[VAL_METRIC] = value
        logger.info("epoch %d: validation MAP@R %.4f", epoch + 1, value)


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """`EarlyStopping` that goes on from the validation scores of the epochs before a resume (`earlier`), so an
    interrupted run stops where an uninterrupted one would."""

    def __init__(self, earlier: Sequence[float] = (), **kwargs):
        super().__init__(**kwargs)
        self.earlier = list(earlier)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for epoch, score in enumerate(self.earlier):  # as `on_epoch_end` counts (min_delta 0, mode "max")
            self.wait += 1
            if self.best is None or score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch, 0


class TrainingClock(keras.callbacks.Callback):
    """Carries a run's training seconds across restarts: every epoch end writes the seconds trained so far, those of
    interrupted attempts included, beside the run's backup (`trained_seconds` reads them back)."""

    def __init__(self, backup_dir: str):
        super().__init__()
        self.backup_dir, self.earlier = backup_dir, trained_seconds(backup_dir)

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        write_json(os.path.join(self.backup_dir, _CLOCK), {"seconds": self.earlier + time.perf_counter() - self.start})


_CLOCK = "training_seconds.json"


class EpochSeeds(keras.callbacks.Callback):
    """Sets every random layer's seed generator (dropout, augmentation) to (its seed, epoch) when an epoch begins, so
    a run resumed at epoch e draws what an uninterrupted run draws there: the backup holds the weights and the
    optimizer, not these states, and a rebuilt model would replay the first epoch's draws."""

    def on_epoch_begin(self, epoch, logs=None):
        for variable in self.model.non_trainable_variables:
            if variable.path.endswith("seed_generator_state"):
                seed = int(keras.ops.convert_to_numpy(variable)[0])
                variable.assign(np.array([seed, epoch << 20], dtype=variable.dtype))  # ~1M draws an epoch apart


def trained_seconds(backup_dir: str) -> float:
    """The seconds an interrupted run trained before (`TrainingClock`); 0 for a new run."""
    return read_json_value(os.path.join(backup_dir, _CLOCK), "seconds", float, 0.0)


def distribution_strategy(name: str):
    """The `tf.distribute` strategy called `name` (see `TrainConfig.strategy`)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise InvalidInputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


class GlobalBatchModel(keras.Model):
    """The trainable model, whose triplet loss always sees the whole batch.

    Mining compares every image of a batch with every other, so when a `tf.distribute` strategy splits a batch over
    replicas, each replica gathers all the embeddings and labels (`ReplicaContext.all_gather`) and computes the loss
    of the whole batch. The gradient of `all_gather` sums over the replicas, so each replica's loss is divided by
    their number: the summed gradient is one device's, and so is the training (tests/test_train.py compares them).

    `proxies` (a `ClassProxies` layer or None), `proxy_loss` and `proxy_weight` add the optional proxy term.
    `trunk_optimizer` (None: `optimizer` updates every weight) updates the weights whose paths are in `trunk_paths`.
    """

    proxies, proxy_loss, proxy_weight = None, None, 1.0
    trunk_optimizer, trunk_paths = None, frozenset()

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        with tf.GradientTape() as tape:
            embeddings = self(x, training=True)
            if replicas > 1:
                y, embeddings = context.all_gather(y, axis=0), context.all_gather(embeddings, axis=0)
            loss = self.loss.call(y, embeddings)
            if self.proxies is not None:
                loss = loss + self.proxy_weight * self.proxy_loss(y, self.proxies(embeddings))
            if self.losses:
                loss = loss + tf.add_n(self.losses)
            share = loss / replicas
        gradients = tape.gradient(share, self.trainable_weights)
        pairs = list(zip(gradients, self.trainable_weights))
        if self.trunk_optimizer is None:
            self.optimizer.apply_gradients(pairs)
        else:
            self.optimizer.apply_gradients([(g, v) for g, v in pairs if v.path not in self.trunk_paths])
            self.trunk_optimizer.apply_gradients([(g, v) for g, v in pairs if v.path in self.trunk_paths])
        self._loss_tracker.update_state(loss)
        return {"loss": self._loss_tracker.result()}


def run_validation_split(config: TrainConfig, labels: np.ndarray,
                         class_disjoint: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(training positions, held-out positions or None) of a run of `config` on `labels`: `validation_split` of
    `config.validation_fraction`, per class where `config.validate_against` is "training" (the held-out images then
    search the training images), else whole classes with `class_disjoint` (None: from 20 classes on).

    Raises:
      InvalidInputError: validation against the training images on a class-disjoint protocol.
    """
    labels = np.asarray(labels)
    if config.validation_fraction <= 0:
        return np.arange(len(labels)), None
    against_training = config.validate_against == "training"
    if against_training and class_disjoint:
        raise InvalidInputError("validate_against='training' searches the training classes, but this protocol's "
                                "database holds other classes: validate against held-out classes ('held-out')")
    return validation_split(labels, config.validation_fraction, config.seed,
                            class_disjoint=False if against_training else class_disjoint)


def fit(config: TrainConfig, inputs: np.ndarray, labels: np.ndarray, run_dir: str, *,
        extra_callbacks: list | None = None, verbose: int = 2, class_disjoint: bool | None = None):
    """Trains on `inputs` [n, ...] / `labels` [n]; returns (trainable model, backbone, head, history dict).

    The validation split is taken from `inputs` (whole classes with `class_disjoint`, see `validation_split`; a share
    of every class where `config.validate_against` is "training", to search the training images); the best epoch's
    weights (by validation MAP@R) are restored at the end. With `config.validation_fraction` 0 every input trains,
    for all `config.epochs`, and the last epoch's weights are kept.
    An interrupted run resumes from `<run_dir>/backup`, and its history then covers every epoch (history.csv), its
    seconds every attempt (`TrainingClock`). Runs under `config.strategy` (`distribution_strategy`).
    """
    labels = np.asarray(labels)
    train_pos, val_pos = run_validation_split(config, labels, class_disjoint)
    validating, against_training = val_pos is not None, config.validate_against == "training"
    backup_dir, history_path = os.path.join(run_dir, "backup"), os.path.join(run_dir, "history.csv")
    batches = BalancedBatches(_take(inputs, train_pos), labels[train_pos], config,
                              start_epoch=_resumed_epoch(backup_dir))
    with distribution_strategy(config.strategy).scope():
        model, backbone, head = compile_trainable(config, tuple(inputs.shape[1:]), batches.classes)
    os.makedirs(run_dir, exist_ok=True)
    best_path = os.path.join(run_dir, "best.weights.h5")
    if batches.start_epoch == 0:  # a new run in an old run directory: the history and best weights are its alone
        for path in (history_path, best_path):
            if os.path.exists(path):
                os.remove(path)
    earlier = _history_before(history_path, batches.start_epoch).get(VAL_METRIC, [])  # a resumed run's scores
    validation = [
        ValidationMapAtR(np.asarray(_take(inputs, val_pos)), labels[val_pos], config.model.hash_bits,
                         *((_take(inputs, train_pos), labels[train_pos]) if against_training else ())),
        keras.callbacks.ModelCheckpoint(best_path, monitor=VAL_METRIC, mode="max", save_best_only=True,
                                        save_weights_only=True, initial_value_threshold=max(earlier, default=None)),
        ResumedEarlyStopping(earlier, monitor=VAL_METRIC, mode="max", patience=config.patience),
    ] if validating else []
    callbacks = [
        *validation,
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
        keras.callbacks.BackupAndRestore(backup_dir),
        EpochSeeds(),
        TrainingClock(backup_dir),
        *(extra_callbacks or []),
    ]
    history = model.fit(batches, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch, shuffle=False,
                        callbacks=callbacks, verbose=verbose)  # (the batches are drawn at random already)
    if validating and os.path.exists(best_path):
        model.load_weights(best_path)
    return model, backbone, head, _run_history(history_path) if batches.start_epoch else history.history


def _run_history(path: str) -> dict[str, list[float]]:
    """{metric: values per epoch} of a run's history.csv: every epoch of a resumed run, those before it too."""
    with open(path, newline="") as f:
        return _history_columns(list(csv.DictReader(f)))


def _history_columns(rows: list[dict[str, str]]) -> dict[str, list[float]]:
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}


def _history_before(path: str, epoch: int) -> dict[str, list[float]]:
    """The history of a resumed run's epochs before `epoch` (`_run_history`), with history.csv cut back to them: an
    epoch logged but not backed up before the interruption runs again, and is logged once."""
    if not epoch or not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [row for row in reader if int(row["epoch"]) < epoch]
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return _history_columns(rows)


def _resumed_epoch(backup_dir: str) -> int:
    """The epoch `keras.callbacks.BackupAndRestore` resumes an interrupted run at (0 for a new run).

    Raises:
      InvalidInputError: a backup that an interruption left damaged (it cannot be resumed from).
    """
    metadata, weights = (os.path.join(backup_dir, name) for name in ("training_metadata.json", "latest.weights.h5"))
    if not os.path.exists(metadata):
        return 0
    epoch = read_json_value(metadata, "epoch", int, -1)
    damaged = "its training_metadata.json" if epoch < 0 else None
    if not damaged:
        import h5py

        try:
            with h5py.File(weights, "r"):
                pass
        except OSError:
            damaged = "its latest.weights.h5"
    if damaged:
        raise InvalidInputError(f"the backup of the interrupted run in {backup_dir} is damaged ({damaged}), so it "
                                f"cannot resume: delete {backup_dir} to train the run from its start")
    return epoch


def train(config: TrainConfig, run_dir: str, *, workdir: str | None = None, protocol: Protocol | None = None,
          inputs: np.ndarray | None = None, verbose: int = 2, runtime: str = "litert",
          command: str | None = None) -> TrainResult:
    """Trains on the protocol's training set and writes the run directory.

    Args:
      config: the run's settings.
      run_dir: output directory: train_config.json, model.json, the head (and backbone weights), history, logs.
      workdir: artefacts directory holding the feature caches (default `features.default_workdir()`).
      protocol: the protocol (default: loaded from `config.protocol` / `config.source`).
      inputs: cached inputs for the whole collection (default: `cache_inputs`, the frozen part run in `runtime`).
      command: the command line that started the run, kept in result.json (and so in evaluation records).

    Returns:
      a `TrainResult`; `result.model_config` is also saved as `<run_dir>/model.json`.
    """
    from tf_retrieval.features.cache import default_workdir
    from tf_retrieval.models.heads import trunk_of
    from tf_retrieval.data.protocols import load_protocol

    resuming = _check_resumable(run_dir, config)  # before any slow work
    start, earlier = time.perf_counter(), trained_seconds(os.path.join(run_dir, "backup"))  # interrupted attempts
    workdir = workdir or default_workdir()
    protocol = protocol or load_protocol(config.protocol, config.source)
    run_validation_split(config, protocol.collection.labels[protocol.train], protocol.class_disjoint or None)  # checks
    if inputs is None:
        inputs = cache_inputs(config, protocol.collection, workdir=workdir, runtime=runtime)
    cache_seconds = time.perf_counter() - start
    _start_run(run_dir, config, resuming)
    labels = protocol.collection.labels
    _, backbone, head, history = fit(config, _take(inputs, protocol.train), labels[protocol.train], run_dir,
                                     verbose=verbose, class_disjoint=protocol.class_disjoint or None)

    name = config.model.name
    head_path = save_with_digest(head.save, run_dir, f"{name}-head", ".keras")
    weights = config.model.weights
    if backbone is not None:
        weights = save_with_digest(trunk_of(backbone).save_weights, run_dir, f"{name}-backbone", ".weights.h5")
    model_config = dataclasses.replace(config.model, weights=weights, head=head_path)
    model_config.save(os.path.join(run_dir, "model.json"))
    scores = history.get(VAL_METRIC, [])
    result = TrainResult(model_config, run_dir, max(scores) if scores else None, len(history.get("loss", [])),
                         earlier + time.perf_counter() - start, {k: [float(v) for v in vs] for k, vs in history.items()})
    write_json(os.path.join(run_dir, "result.json"), {
        "best_map_at_r": result.best_map_at_r, "epochs": result.epochs, "seconds": round(result.seconds, 1),
        "cache_seconds": round(cache_seconds, 1), "command": command, "history": result.history}, indent=1)
    shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)
    logger.info("trained %s in %.0f s: %s", name, result.seconds, result.validation_summary)
    return result


def _check_resumable(run_dir: str, config: TrainConfig) -> bool:
    """Whether `run_dir` holds an interrupted run (a backup) to resume; it resumes only with the config it started with.

    Raises:
      InvalidInputError: an interrupted run of another config, or a damaged backup.
    """
    if not _resumed_epoch(os.path.join(run_dir, "backup")):
        return False
    try:
        started = TrainConfig.load(os.path.join(run_dir, "train_config.json"))
    except (MissingError, InvalidInputError):
        started = None
    if started != config:
        changed = sorted(key for key, value in config.to_dict().items()
                         if started is None or started.to_dict().get(key) != value)
        raise InvalidInputError(
            f"{run_dir} holds an interrupted run of another config (it differs in {', '.join(changed)}): resume it "
            f"with the same settings, train into another --run-dir, or delete {os.path.join(run_dir, 'backup')} to "
            "start this one there")
    return True


def _start_run(run_dir: str, config: TrainConfig, resuming: bool) -> None:
    """Writes `config` as the run's train_config.json; a new run first removes a finished run's results, so that until
    it finishes the directory holds no run (a recipe would take a finished run of the new config for a trained
    stage)."""
    if not resuming:
        for name in ("model.json", "result.json"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    config.save(os.path.join(run_dir, "train_config.json"))


def train_recipe(recipe: Recipe, run_dir: str, *, workdir: str | None = None, protocol: Protocol | None = None,
                 verbose: int = 2, runtime: str = "litert", command: str | None = None) -> TrainResult:
    """Trains the stages of `recipe` in order, each from the fine-tuned trunk of the stage before it (`train`'s
    arguments); returns the last stage's result.

    The last stage writes `run_dir`, stage k before it `<run_dir>-stage<k>`. An earlier stage whose directory holds
    a finished run of the same config is not trained again, so a recipe that was stopped goes on where it stopped (a
    stage stopped half-way resumes from its backup, as any run does).
    """
    from tf_retrieval.data.protocols import load_protocol

    # every stage trains on the same protocol and source (`Recipe`): load it once
    protocol = protocol or load_protocol(recipe.stages[0].protocol, recipe.stages[0].source)
    trunk = None
    for number, config in enumerate(recipe.stages, 1):
        if trunk is not None:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, weights=trunk))
        stage_dir = run_dir if number == len(recipe.stages) else f"{run_dir}-stage{number}"
        if stage_dir != run_dir and (trunk := _finished_trunk(stage_dir, config)):
            logger.info("stage %d of %d: %s is trained already", number, len(recipe.stages), stage_dir)
            continue
        logger.info("stage %d of %d: training %s", number, len(recipe.stages), stage_dir)
        result = train(config, stage_dir, workdir=workdir, protocol=protocol, verbose=verbose, runtime=runtime,
                       command=command)
        trunk = result.model_config.weights
    return result


def _finished_trunk(run_dir: str, config: TrainConfig) -> str | None:
    """The fine-tuned trunk of the finished run in `run_dir` if that run was trained with `config`, else None."""
    try:
        trained_with, model = load_run(run_dir)
    except (MissingError, InvalidInputError):
        return None
    return model.weights if trained_with == config and os.path.isfile(model.weights or "") else None
