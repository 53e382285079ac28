"""Configuration dataclasses, saved as JSON next to every artefact they produced."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin: `to_dict`, `from_dict` (unknown keys are an error), `save(path)`, `load(path)`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(values)


@dataclasses.dataclass
class ModelConfig(JsonConfig):
    """An embedding model: a frozen backbone, optionally followed by a trained head, then L2 normalisation.

    Attributes:
      name: the model's name ("baseline", "finetuned", ...), also its TF Serving model name.
      backbone: a name from `backbones.BACKBONES`.
      image_size: square input size in pixels.
      pooling: "avg", "gem" or "max".
      weights: "imagenet", None (random) or a weights file for the backbone.
      head: path to a trained head (a `.keras` file), or None for the baseline (identity head).
      version: model version; indexes built with one version refuse queries from another.
    """

    name: str = "baseline"
    backbone: str = "efficientnet_lite0"
    image_size: int = 96
    pooling: str = "avg"
    weights: str | None = "imagenet"
    head: str | None = None
    version: int = 1

    def model_id(self) -> str:
        """Identifies the embedding space: two models with the same id give comparable vectors."""
        from tf_retrieval.backbones import backbone_id

        head = "identity" if self.head is None else os.path.basename(self.head)
        return f"{self.name}:v{self.version}:{backbone_id(self.backbone, self.image_size, self.pooling, self.weights)}:{head}"


@dataclasses.dataclass
class TrainConfig(JsonConfig):
    """Everything that determines a training run (saved as `train_config.json` in the run directory).

    Attributes:
      protocol: evaluation protocol whose training set is used (DESIGN.md §2).
      source: dataset source for the protocol (default: the tfds dataset of its family).
      name: model name of the result (also its TF Serving name).
      backbone, image_size, pooling, weights: the frozen backbone (see `ModelConfig`).
      train_from: trunk layer whose activations are cached and from which the top trains; None = head only;
        "images" = end to end on augmented images (GPU advised).
      embedding_dim, hidden_dim, dropout: head sizes (see `heads.build_head`).
      hash_bits: train a hashing head with this many bits instead of a float embedding.
      mining: triplet mining: "semihard", "hard" or "batch-all".
      margin, learning_rate: loss margin (on unit-length embeddings) and Adam learning rate.
      classes_per_batch, images_per_class: P and K of the class-balanced batches.
      epochs, steps_per_epoch, patience: training length and early-stopping patience (epochs without a better MAP@R).
      validation_fraction: share of the training set (images or classes) held out for MAP@R.
      seed: seeds batches, the validation split and initialisation.
    """

    protocol: str = "cifar10-2"
    source: str | None = None
    name: str = "finetuned"
    backbone: str = "efficientnet_lite0"
    image_size: int = 96
    pooling: str = "avg"
    weights: str | None = "imagenet"
    train_from: str | None = None
    embedding_dim: int = 128
    hidden_dim: int = 512
    dropout: float = 0.1
    hash_bits: int | None = None
    mining: str = "semihard"
    margin: float = 0.2
    learning_rate: float = 1e-3
    classes_per_batch: int = 16
    images_per_class: int = 8
    epochs: int = 30
    steps_per_epoch: int = 100
    patience: int = 5
    validation_fraction: float = 0.1
    seed: int = 0

    def base_model(self) -> ModelConfig:
        """The frozen baseline this run starts from."""
        return ModelConfig(name="baseline", backbone=self.backbone, image_size=self.image_size, pooling=self.pooling,
                           weights=self.weights)
