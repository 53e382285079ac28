"""A `keras_tuner.HyperModel` over the Siamese head, trained on cached backbone outputs.

Each trial is an ordinary `tfr train` run in miniature: the same trainable model (`train.compile_trainable`), the same
class-balanced P x K batches (`train.BalancedBatches`), the same triplet losses, and the same validation MAP@R
(`train.ValidationMapAtR`) on the same held-out part of the training set (`train.validation_split`: whole classes when
there are at least 20, else a stratified share of the images). So the score a trial reports is the number `tfr train`
would report for the configuration the trial stands for, and `SiameseHyperModel.trial_config` turns the trial's values
back into that `TrainConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import keras_tuner
import numpy as np

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.config import END_TO_END, TrainConfig
from tf_retrieval.training.train import VAL_METRIC, BalancedBatches, ValidationMapAtR, compile_trainable, \
    validation_split

OBJECTIVE = keras_tuner.Objective(VAL_METRIC, direction="max")
MININGS = ("semihard", "hard", "batch-all")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What the tuner searches; everything else comes from the base `TrainConfig`.

    Attributes:
      embedding_dims: embedding sizes (choice).
      margins: (min, max, step) of the triplet margin on unit-length embeddings.
      learning_rates: (min, max) of Adam's learning rate, sampled on a log scale.
      minings: triplet mining strategies (choice): "semihard", "hard", "batch-all".
      hidden_dims: widths of the head's hidden layer (choice); 0 is a single linear projection.
    """

    embedding_dims: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    margins: tuple[float, float, float] = (0.05, 0.5, 0.05)
    learning_rates: tuple[float, float] = (1e-4, 1e-2)
    minings: tuple[str, ...] = MININGS
    hidden_dims: tuple[int, ...] = (0, 256, 512, 1024)

    def __post_init__(self):
        low, high, step = self.margins
        if not (self.embedding_dims and all(int(d) >= 1 for d in self.embedding_dims)):
            raise InvalidInputError(f"embedding_dims must be positive integers, got {self.embedding_dims}")
        if not 0 < low <= high or step <= 0:
            raise InvalidInputError(f"margins must be (min, max, step) with 0 < min <= max and step > 0, got {self.margins}")
        if not 0 < self.learning_rates[0] <= self.learning_rates[1]:
            raise InvalidInputError(f"learning_rates must be (min, max) with 0 < min <= max, got {self.learning_rates}")
        unknown = sorted(set(self.minings) - set(MININGS))
        if not self.minings or unknown:
            raise InvalidInputError(f"unknown mining(s) {unknown}; choose from {', '.join(MININGS)}")
        if not (self.hidden_dims and all(int(h) >= 0 for h in self.hidden_dims)):
            raise InvalidInputError(f"hidden_dims must be non-negative integers, got {self.hidden_dims}")

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def check_tunable(base: TrainConfig) -> None:
    """Refuses a base config that tuning cannot search as `tfr train` would train it.

    Raises:
      InvalidInputError: a hashing head, augmented views, validation against the training images, or end-to-end
        training (trials train heads on cached inputs; a trunk trained on every image is `tfr train`'s).
    """
    if base.model.hash_bits:
        raise InvalidInputError("tuning searches float embedding heads: set hash_bits to None in the base config")
    if base.augment:  # trials would train on the plain view only, and score what `tfr train` would not
        raise InvalidInputError(f"tuning trains on the plain cached inputs: drop augment {list(base.augment)} from "
                                "the base config (tune first, then train the best config with its views)")
    if base.validate_against != "held-out":
        raise InvalidInputError("tuning scores held-out images searching each other: validate_against must be "
                                f"'held-out' in the base config, not {base.validate_against!r}")
    if base.model.train_from == END_TO_END:
        raise InvalidInputError("tuning trains heads on cached features or activations: train_from 'images' (end to "
                                "end) would hold every decoded training image in memory; tune a head or the top "
                                "blocks (--train-from LAYER), then train end to end with `tfr train`")


class SiameseHyperModel(keras_tuner.HyperModel):
    """Builds and trains one trial's head on in-memory cached inputs.

    Args:
      base: the settings that are not searched (backbone, P x K, epochs, patience, validation fraction, seed, ...).
      inputs: cached inputs of the training set [n, ...] (`train.cache_inputs`, restricted to the protocol's train
        positions).
      labels: their class labels [n].
      space: the search space (default `SearchSpace()`).
      class_disjoint: validate on whole held-out classes (`train.validation_split`; default: when there are many).

    Raises:
      ValueError: a hashing base config (the embedding size of a hashing head is its bit count; tune float heads), or a
        training set from which no validation set can be held out.
    """

    def __init__(self, base: TrainConfig, inputs: np.ndarray, labels: np.ndarray, space: SearchSpace | None = None,
                 class_disjoint: bool | None = None):
        super().__init__(name="siamese_head", tunable=True)
        check_tunable(base)
        labels = np.asarray(labels)
        if len(inputs) != len(labels):
            raise InvalidInputError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.base, self.space = base, space or SearchSpace()
        train_pos, val_pos = validation_split(labels, base.validation_fraction, base.seed, class_disjoint=class_disjoint)
        self.input_shape = tuple(inputs.shape[1:])
        self.train_inputs, self.train_labels = inputs[train_pos], labels[train_pos]
        self.val_inputs, self.val_labels = inputs[val_pos], labels[val_pos]
        self.validation_classes = len(np.unique(self.val_labels))
        self.class_disjoint = not set(np.unique(self.train_labels).tolist()) & set(np.unique(self.val_labels).tolist())

    def trial_config(self, hp: keras_tuner.HyperParameters) -> TrainConfig:
        """The `TrainConfig` a trial stands for: the base config with the trial's values (declares them on first use)."""
        space = self.space
        low, high, step = space.margins
        return dataclasses.replace(
            self.base,
            embedding_dim=int(hp.Choice("embedding_dim", [int(d) for d in space.embedding_dims])),
            hidden_dim=int(hp.Choice("hidden_dim", [int(h) for h in space.hidden_dims])),
            mining=str(hp.Choice("mining", list(space.minings))),
            margin=round(float(hp.Float("margin", low, high, step=step)), 6),
            learning_rate=float(hp.Float("learning_rate", *space.learning_rates, sampling="log")),
        )

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        config = self.trial_config(hp)
        return compile_trainable(config, self.input_shape, len(np.unique(self.train_labels)))[0]

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, callbacks: Sequence | None = None,
            epochs: int | None = None, initial_epoch: int = 0, verbose: int = 0, **kwargs) -> keras.callbacks.History:
        """Trains `model` for the trial; `val_map_at_r` is in the epoch logs before the tuner's own callbacks run.

        `epochs` / `initial_epoch` come from Hyperband; otherwise the base config's `epochs`, with early stopping after
        `patience` epochs without a better validation MAP@R (as in `tfr train`).
        """
        if args or kwargs:
            raise TypeError(f"SiameseHyperModel.fit takes no data arguments (it trains on the inputs it was given); "
                            f"got {len(args)} positional and {sorted(kwargs)}")
        config = self.trial_config(hp)
        epochs = epochs or config.epochs
        batches = BalancedBatches(self.train_inputs, self.train_labels, config, epochs=epochs,
                                  start_epoch=initial_epoch)  # the same draws as an uninterrupted run
        callbacks = [ValidationMapAtR(self.val_inputs, self.val_labels),  # first: the others read its value
                     keras.callbacks.EarlyStopping(monitor=VAL_METRIC, mode="max", patience=config.patience),
                     *(callbacks or [])]
        return model.fit(batches, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=config.steps_per_epoch,
                         shuffle=False, callbacks=callbacks, verbose=verbose)
