"""Configuration dataclasses, saved as JSON next to every artefact they produced."""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import numbers
import os
import re
from typing import Any, Iterator, TypeVar

from tf_retrieval.errors import InvalidInputError, MissingError
from tf_retrieval.storage import file_digest, read_json_value, write_json

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
            raise InvalidInputError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        return cls.from_dict(_read_config_file(path))


def _read_config_file(path: str | os.PathLike) -> Any:
    """The JSON value of a config file, with clear errors for a missing file or bad JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MissingError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"config file {path} is not valid JSON: {exc}") from None


#: The backbones `models.backbones` builds (their constructors live there: importing this module loads no Keras).
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "densenet121", "resnet50",
                  "mobilenet_v2", "efficientnet_b0")
#: Global poolings of the backbone's feature map.
POOLINGS = ("avg", "gem", "max")


#: `ModelConfig.scales` of a single-scale model.
SINGLE_SCALE = (1.0,)


def scale_sizes(image_size: int, scales: tuple[float, ...] = SINGLE_SCALE) -> list[int]:
    """The input sizes of a multi-scale backbone: `image_size` times each scale, rounded.

    Raises:
      InvalidInputError: several scales, one of which goes below 32 px (a single scale is the plain `image_size`), or
        two that round to the same size.
    """
    sizes = [int(round(image_size * scale)) for scale in scales]
    if len(sizes) > 1 and min(sizes) < 32:
        raise InvalidInputError(f"scales {list(scales)} of {image_size} px go below 32 px")
    if len(set(sizes)) != len(sizes):
        raise InvalidInputError(f"scales {list(scales)} of {image_size} px give the same size twice: {sizes}")
    return sizes


#: Input normalisations of a backbone (`models.backbones.ImagePreprocessing`): caffe (BGR minus the ImageNet mean),
#: torch (ImageNet mean / std), tf (x / 127.5 - 1, inception style), none.
PREPROCESSINGS = ("caffe", "torch", "tf", "none")
#: Each backbone's own input normalisation, the one its ImageNet weights were trained on: the default of
#: `ModelConfig.preprocessing`. The EfficientNet-Lite checkpoints are the TensorFlow ones, trained on "tf" inputs.
BACKBONE_PREPROCESSING = {"efficientnet_lite0": "tf", "efficientnet_lite1": "tf", "efficientnet_lite2": "tf",
                          "densenet121": "torch", "resnet50": "caffe", "mobilenet_v2": "tf", "efficientnet_b0": "none"}
#: The normalisation that ids leave unnamed, and that a config file without a `preprocessing` field means: the
#: backbone's own, except EfficientNet-Lite, which ran on "torch" inputs before its own became "tf" (docs/training.md).
#: So the ids, caches, bundles and records made before stay valid, for `preprocessing="torch"`.
UNNAMED_PREPROCESSING = {**BACKBONE_PREPROCESSING, "efficientnet_lite0": "torch", "efficientnet_lite1": "torch",
                         "efficientnet_lite2": "torch"}
assert tuple(BACKBONE_PREPROCESSING) == BACKBONE_NAMES, "every backbone needs its own input normalisation"


def input_preprocessing(name: str, preprocessing: str | None = None) -> str:
    """The input normalisation a backbone runs on: `preprocessing`, or where that is None the backbone's own."""
    return preprocessing or BACKBONE_PREPROCESSING[name]


def named_preprocessing(name: str, preprocessing: str | None = None) -> str | None:
    """The input normalisation as ids and records name it: None where it is `UNNAMED_PREPROCESSING`'s."""
    inputs = input_preprocessing(name, preprocessing)
    return None if inputs == UNNAMED_PREPROCESSING[name] else inputs


def backbone_id(name: str, image_size: int, pooling: str, weights: str | None,
                scales: tuple[float, ...] = SINGLE_SCALE, flip: bool = False, preprocessing: str | None = None) -> str:
    """A readable string naming everything that determines a backbone's features (used in cache keys and model ids).

    The input normalisation is named ("-tfinputs") where it is not `UNNAMED_PREPROCESSING`'s; `preprocessing` None is
    the backbone's own."""
    multiscale = "" if tuple(scales) == SINGLE_SCALE else "-x" + "_".join(f"{scale:g}" for scale in scales)
    multiscale += "-flip" if flip else ""
    inputs = named_preprocessing(name, preprocessing)
    multiscale += f"-{inputs}inputs" if inputs else ""
    if weights is None:
        weights_tag = "random"
    elif weights == "imagenet":
        weights_tag = "imagenet"
    else:  # a weights file: its base name, made safe for file and model names, and its content
        weights_tag = re.sub(r"[^A-Za-z0-9_-]+", "_", file_tag(weights))
    return f"{name}-{image_size}px{multiscale}-{pooling}-{weights_tag}"


def file_tag(path: str | os.PathLike) -> str:
    """Names a model file in ids: its base name and `@` a digest of its content ("@missing" where there is no such
    file), so that a file rewritten in place, or another of the same name, gives another id."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return f"{os.path.basename(path)}@missing"
    stat = os.stat(path)
    return f"{os.path.basename(path)}@{_content_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """The first 8 hex digits of a file's sha256 (cached by size and modification time: ids are asked for often)."""
    del size, mtime_ns  # part of the cache key only
    return file_digest(path)[:8]


@dataclasses.dataclass
class ModelConfig(JsonConfig):
    """Everything an embedding model is: a backbone, optionally a trained head, and how its outputs are finished.

    Attributes:
      name: the model's name ("baseline", "finetuned", ...), also its TF Serving model name.
      backbone: a name from `BACKBONE_NAMES` (built by `models.backbones`).
      image_size: square input size in pixels.
      pooling: "avg", "gem" or "max".
      scales: multi-scale descriptors: the backbone also runs on the input scaled down by each factor (in (0, 1], e.g.
        [1, 0.889, 0.778, 0.667] at 288 px: 288, 256, 224 and 192 px) and pools over all of them, as GeM pools over a
        feature map (Radenović et al. 2018). [1.0], the default, is a single-scale model.
      flip: test-time flip augmentation: the backbone also runs on the mirrored image (left-right) and pools over
        both, so an image and its mirror get the same vector. Twice the backbone's compute; training ignores it (its
        mirrored views are `TrainConfig.augment`), so it can be turned on for any trained model (one that `tfr adapt`
        made excepted: adapt it again).
      preprocessing: the backbone's input normalisation (`PREPROCESSINGS`); None: its own (`BACKBONE_PREPROCESSING`).
        For EfficientNet-Lite that is "tf", what its checkpoints were trained on; its earlier models (until
        2026-12-07; their records name no preprocessing) ran on "torch" (ImageNet mean / std), and a config file
        without this field means "torch" for it (`from_dict`).
      weights: "imagenet", None (random) or a weights file for the backbone (a fine-tuned trunk).
      head: path to a trained head (a `.keras` file), or None for the baseline (identity head).
      train_from: how deep training reached (None: the head only; a trunk layer name: the blocks above it; "images":
        end to end). Recorded for reports; the weights file holds the trained trunk.
      hash_bits: a hashing model: its vectors are `hash_bits`-bit binary codes, packed 8 to a byte and compared by
        Hamming distance; None for float embeddings (unit length).
      version: model version; indexes built with one version refuse queries from another.
    """

    name: str = "baseline"
    backbone: str = "efficientnet_lite0"
    image_size: int = 96
    pooling: str = "avg"
    scales: tuple[float, ...] = SINGLE_SCALE
    flip: bool = False
    preprocessing: str | None = None
    weights: str | None = "imagenet"
    head: str | None = None
    train_from: str | None = None
    hash_bits: int | None = None
    version: int = 1

    def __post_init__(self):
        if self.backbone not in BACKBONE_NAMES:
            raise InvalidInputError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
        if self.pooling not in POOLINGS:
            raise InvalidInputError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 32:
            raise InvalidInputError(f"image_size must be a whole number of pixels, at least 32, got {self.image_size!r}")
        if self.hash_bits is not None and (isinstance(self.hash_bits, bool) or int(self.hash_bits) < 1):
            raise InvalidInputError(f"hash_bits must be a positive number of bits, got {self.hash_bits!r}")
        try:
            self.scales = tuple(float(scale) for scale in self.scales)
        except (TypeError, ValueError):
            raise InvalidInputError(f"scales must be a list of numbers, got {self.scales!r}") from None
        if not self.scales or len(set(self.scales)) != len(self.scales) or not all(0 < s <= 1 for s in self.scales):
            raise InvalidInputError(f"scales must be distinct factors in (0, 1], e.g. [1, 0.875, 0.75], got "
                                    f"{list(self.scales)}")
        scale_sizes(self.image_size, self.scales)  # refuses scales below 32 px
        if not isinstance(self.flip, bool):
            raise InvalidInputError(f"flip must be true or false, got {self.flip!r}")
        if self.preprocessing is not None and self.preprocessing not in PREPROCESSINGS:
            raise InvalidInputError(f"unknown preprocessing {self.preprocessing!r}; choose one of "
                                    f"{', '.join(PREPROCESSINGS)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """As `JsonConfig.from_dict`; a file without `preprocessing` was written before the field existed, when
        EfficientNet-Lite ran on "torch" inputs: it gets `UNNAMED_PREPROCESSING` (None where that is the own one)."""
        backbone = values.get("backbone", cls.backbone)
        if "preprocessing" not in values and backbone in BACKBONE_NAMES:  # (an unknown one is __post_init__'s error)
            legacy = UNNAMED_PREPROCESSING[backbone]
            values = {**values, "preprocessing": None if legacy == BACKBONE_PREPROCESSING[backbone] else legacy}
        return super().from_dict(values)

    @property
    def metric(self) -> str:
        """The similarity its vectors are meant for: "hamming" for a hashing model, else "cosine"."""
        return "hamming" if self.hash_bits else "cosine"

    @property
    def fine_tuned(self) -> bool:
        """Whether training made part of it: a head, or backbone weights from a file (a fine-tuned trunk)."""
        return self.head is not None or self.weights not in ("imagenet", None)

    def backbone_key(self) -> str:
        """Names the backbone's features (`backbone_id`): feature caches are keyed by it."""
        return backbone_id(self.backbone, self.image_size, self.pooling, self.weights, self.scales, self.flip,
                           self.preprocessing)

    def embedding_space(self) -> str:
        """Names what its vectors are, whatever the model is called: version, backbone features, head, codes."""
        head = "identity" if self.head is None else file_tag(self.head)
        codes = f":hash{self.hash_bits}" if self.hash_bits else ""
        return f"v{self.version}:{self.backbone_key()}:{head}{codes}"

    def model_id(self) -> str:
        """Identifies the model and its embedding space: two models with the same id give comparable vectors."""
        return f"{self.name}:{self.embedding_space()}"

    def save(self, path: str | os.PathLike) -> None:
        """Writes it as JSON, with a weights file or head named by a relative path made absolute: the file is the same
        whichever folder reads the config later (a run's model.json, the copy in each index bundle)."""
        files = {"weights": None if self.weights == "imagenet" else self.weights, "head": self.head}
        absolute = {field: os.path.abspath(file) for field, file in files.items()
                    if file and "://" not in file and not os.path.isabs(file)}
        JsonConfig.save(dataclasses.replace(self, **absolute), path)


#: `train_from` of end-to-end training (the whole trunk on decoded images).
END_TO_END = "images"
#: Views of the training images that `TrainConfig.augment` caches (`training.train.ImageView`).
AUGMENTATIONS = ("flip", "zoom", "zoom-tl", "zoom-tr", "zoom-bl", "zoom-br")
#: `TrainConfig.lr_schedule` values.
LR_SCHEDULES = ("constant", "cosine")
#: What the held-out images are searched against in validation (`TrainConfig.validate_against`).
VALIDATION_SEARCHES = ("held-out", "training")
#: `TrainConfig.mining` values (`training.losses.get`, where case and "_" / "-" do not matter).
MININGS = ("semi-hard", "semihard", "hard", "batch-hard", "batch-all", "all")
#: `TrainConfig.strategy` values (`training.train.distribution_strategy`).
STRATEGIES = ("default", "mirrored", "multiworker")
#: `TrainConfig.proxy_loss` values (None: the triplet loss alone; `training.proxies`).
PROXY_LOSSES = ("cosface", "proxy-anchor")
#: How a hashing head makes its codes (`TrainConfig.hashing`, `models.heads.build_head(hashing=...)`).
HASHINGS = ("tanh", "greedy")

#: The `ModelConfig` fields a training run sets (`TrainConfig.model`; `tfr train` has a flag for each).
TRAINED_MODEL_FIELDS = ("name", "backbone", "image_size", "pooling", "scales", "flip", "preprocessing", "weights",
                        "train_from", "hash_bits")
#: Those that older run files have flat, beside the training fields (`flip` and `preprocessing` came after the move
#: into `model`).
_FLAT_MODEL_FIELDS = tuple(field for field in TRAINED_MODEL_FIELDS if field not in ("flip", "preprocessing"))


@dataclasses.dataclass
class TrainConfig(JsonConfig):
    """Everything that determines a training run (saved as `train_config.json` in the run directory).

    Attributes:
      protocol: evaluation protocol whose training set is used (DESIGN.md §2).
      source: dataset source for the protocol (default: the tfds dataset of its family).
      model: the model to train: its name, the backbone it starts from (`weights` are the starting weights), how deep
        training reaches (`train_from`: None = head only; a trunk layer whose activations are cached and above which
        the trunk trains; "images" = end to end on augmented images, GPU advised) and `hash_bits` for a hashing head.
        Its `head` stays None: the head is what training produces. Its `flip` (test-time) passes to the trained
        model: training itself runs the backbone without it.
      embedding_dim, hidden_dim, dropout: head sizes (see `models.heads.build_head`).
      mining: triplet mining: "semihard", "hard" or "batch-all".
      margin, learning_rate: loss margin (on unit-length embeddings) and Adam learning rate.
      lr_schedule: how the learning rate moves over the run (`LR_SCHEDULES`): "constant", or "cosine", which decays
        it to 1% along a half cosine over all `epochs` x `steps_per_epoch` steps (Loshchilov & Hutter 2017, without
        restarts; a resumed run continues the curve where it stopped).
      trunk_lr_scale: the trunk's learning rate as a share of the head's (discriminative fine-tuning: below 1 keeps
        the trained blocks nearer ImageNet's weights while the head learns at `learning_rate`); the trunk then has an
        Adam optimiser of its own, on the same schedule. Only for runs that train part of the trunk (`train_from`).
      proxy_loss, proxy_weight: an optional second term, `proxy_weight` x a loss against learned class proxies
        (`training.proxies`: "cosface" or "proxy-anchor"); None trains with the triplet loss alone.
      hashing: how a hashing head (`model.hash_bits`) makes its codes: "tanh" or "greedy" (`models.heads.build_head`).
      augment: views of the training images cached beside the plain one when training reads cached features or
        activations (`AUGMENTATIONS`: "flip" mirrors an image, "zoom" scales its centre 7/8 back up, "zoom-tl"
        ... "zoom-br" its top-left ... bottom-right 7/8, i.e. shifted crops);
        every batch draws one view of each image at random. End-to-end training augments on the fly instead: it
        flips and shifts every image, and `randaugment` adds more.
      randaugment: strength in (0, 1] of RandAugment (Cubuk et al. 2020; `keras.layers.RandAugment`, 2 operations
        of shear, rotation, colour, contrast, posterisation, ... on each batch, their magnitudes drawn per image)
        on top of flip and shift in end-to-end training; 0 = off. Meant for small training sets; at 0.5 it did not
        help cifar10-1 (docs/training.md). Only for end-to-end runs (a cached view is fixed: `augment` holds those).
      classes_per_batch, images_per_class: P and K of the class-balanced batches.
      epochs, steps_per_epoch, patience: training length and early-stopping patience (epochs without a better MAP@R).
      validation_fraction: share of the training set (images or classes) held out for MAP@R. 0 holds out nothing:
        the run trains on every training image for exactly `epochs` epochs and keeps the last, a final fit once a
        validating run has chosen the recipe. Where the protocol's database is its training set (cifar10-2), the
        held-out tenth is otherwise a tenth of the database the model never fitted.
      validate_against: what the held-out images search in validation (`VALIDATION_SEARCHES`). "held-out": each
        other (leave-one-out), and the split holds out whole classes where there are 20 or more: the measure for
        classes the model never saw. "training": the images that train, and the split holds out a share of every
        class: the measure for protocols whose database is the training set (cifar10-2, flowers-official), where
        unseen queries search images the model fitted. It embeds and ranks the training images every epoch.
      seed: seeds batches, the validation split and initialisation.
      strategy: where training runs (`training.train.STRATEGIES`): "default" (one device), "mirrored" (every local
        GPU, else every logical CPU device, one replica each) or "multiworker" (the machines of `TF_CONFIG`). The loss
        is computed on the whole batch in every case, so the strategy changes where, not what, is computed.
    """

    protocol: str = "cifar10-2"
    source: str | None = None
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name="finetuned"))
    embedding_dim: int = 128
    hidden_dim: int = 512
    dropout: float = 0.1
    mining: str = "semihard"
    margin: float = 0.2
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    trunk_lr_scale: float = 1.0
    proxy_loss: str | None = None
    proxy_weight: float = 1.0
    hashing: str = "tanh"
    augment: tuple[str, ...] = ()
    randaugment: float = 0.0
    classes_per_batch: int = 16
    images_per_class: int = 8
    epochs: int = 30
    steps_per_epoch: int = 100
    patience: int = 5
    validation_fraction: float = 0.1
    validate_against: str = "held-out"
    seed: int = 0
    strategy: str = "default"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Also reads the older flat layout, where the model fields sat beside the training fields."""
        values = dict(values)
        model = values.pop("model", None)
        model = dict(model) if isinstance(model, dict) else ({} if model is None else model.to_dict())
        model.update({field: values.pop(field) for field in _FLAT_MODEL_FIELDS if field in values})
        model = ModelConfig.from_dict({"name": "finetuned", **model})
        return super().from_dict({**values, "model": model})

    def __post_init__(self):
        self._check_choices()
        for name, least in (("epochs", 1), ("steps_per_epoch", 1), ("classes_per_batch", 2), ("images_per_class", 2),
                            ("patience", 0), ("embedding_dim", 1), ("hidden_dim", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                why = {"classes_per_batch": ": a batch needs negatives", "images_per_class": ": a batch needs "
                       "positives"}.get(name, "")
                raise InvalidInputError(f"{name} must be a whole number, at least {least}{why}; got {value!r}")
        if self.model.train_from and len(self.model.scales) > 1:
            raise InvalidInputError("a multi-scale model (scales) trains its head only: train_from must be None")
        self.augment = tuple(self.augment or ())
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidInputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.trunk_lr_scale > 0:
            raise InvalidInputError(f"trunk_lr_scale must be > 0, got {self.trunk_lr_scale}")
        if self.trunk_lr_scale != 1 and not self.model.train_from:
            raise InvalidInputError("trunk_lr_scale sets the learning rate of the trained trunk blocks: it needs "
                                    "train_from (a head-only run trains no trunk)")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown or len(set(self.augment)) != len(self.augment):
            raise InvalidInputError(f"augment takes distinct views of {', '.join(AUGMENTATIONS)}, got "
                                    f"{list(self.augment)}")
        if self.augment and self.model.train_from == END_TO_END:
            raise InvalidInputError("end-to-end training augments its images on the fly: augment is for training on "
                                    "cached features or activations")
        if not 0 <= self.validation_fraction < 1:
            raise InvalidInputError(f"validation_fraction must be in [0, 1) (0: no validation), got "
                                    f"{self.validation_fraction}")
        if self.validate_against not in VALIDATION_SEARCHES:
            raise InvalidInputError(f"validate_against must be one of {', '.join(VALIDATION_SEARCHES)}, got "
                                    f"{self.validate_against!r}")
        if not 0 <= self.randaugment <= 1:
            raise InvalidInputError(f"randaugment is a strength in [0, 1], got {self.randaugment}")
        if self.randaugment and self.model.train_from != END_TO_END:
            raise InvalidInputError("randaugment augments decoded images on the fly: it needs end-to-end training "
                                    f"(train_from={END_TO_END!r})")

    def _check_choices(self) -> None:
        mining = self.mining.lower().replace("_", "-") if isinstance(self.mining, str) else self.mining
        for name, value, choices in (("mining", mining, MININGS), ("strategy", self.strategy, STRATEGIES),
                                     ("proxy_loss", self.proxy_loss, (None, *PROXY_LOSSES)),
                                     ("hashing", self.hashing, HASHINGS)):
            if value not in choices:
                raise InvalidInputError(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                        f"{', '.join(str(choice) for choice in choices)}")

    def base_model(self) -> ModelConfig:
        """The frozen baseline this run starts from (float embeddings of the starting backbone)."""
        return dataclasses.replace(self.model, name="baseline", head=None, train_from=None, hash_bits=None)


def with_changes(config: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """`config` with `changes` applied: TrainConfig fields and the model's `TRAINED_MODEL_FIELDS`, all by name (as
    `tfr train` flags name them), or model fields in a nested "model" object (as recipe files write the model).

    Raises:
      InvalidInputError: a "model" that is no object.
    """
    values = config.to_dict()
    model = values.pop("model")
    changes = dict(changes)
    nested = changes.pop("model", None)
    if nested is not None and not isinstance(nested, dict):
        raise InvalidInputError(f"model changes must be an object of model fields, got {str(nested)[:100]!r}")
    model.update(nested or {})
    model.update({name: value for name, value in changes.items() if name in TRAINED_MODEL_FIELDS})
    values.update({name: value for name, value in changes.items() if name not in TRAINED_MODEL_FIELDS})
    return TrainConfig.from_dict({**values, "model": model})


#: What every stage of a recipe keeps from its first: the same data, validation split and network. (A stage with
#: another seed would validate on images an earlier stage trained on.) A stage may hold out nothing instead
#: (validation_fraction 0, a final fit), and so must every stage after it.
STAGE_FIXED_FIELDS = ("protocol", "source", "seed", "validation_fraction", "validate_against")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train a model: one run, or runs in stages, each going on from the fine-tuned trunk of the one before.

    A recipe file is a TrainConfig JSON file (the first stage) with an optional `"then"`: the changes of each later
    stage to the stage before it, fields by name as in `with_changes`, e.g. `"then": [{"epochs": 8,
    "trunk_lr_scale": 0.5}]`. A later stage's `model.weights` is set when the stage before it has run (its fine-tuned
    trunk: `training.train.train_recipe`), so every stage but the last trains its trunk (`model.train_from`); all
    keep `STAGE_FIXED_FIELDS` and the backbone, but for a final fit: from some stage on, validation_fraction 0.
    """

    stages: tuple[TrainConfig, ...]

    def __post_init__(self):
        if not self.stages:
            raise InvalidInputError("a recipe has at least one stage")
        first = self.stages[0]
        for number, (before, stage) in enumerate(zip(self.stages, self.stages[1:]), 2):
            if not before.model.train_from:
                raise InvalidInputError(f"stage {number} of the recipe goes on from the fine-tuned trunk of stage "
                                        f"{number - 1}, which trains no trunk (its train_from is None)")
            changed = [name for name in STAGE_FIXED_FIELDS if getattr(stage, name) != getattr(first, name)
                       and not (name == "validation_fraction" and stage.validation_fraction == 0)]
            if before.validation_fraction == 0 and stage.validation_fraction:
                changed.append("validation_fraction (after a stage that held out nothing)")
            changed += ["backbone"] if stage.model.backbone != first.model.backbone else []
            if changed:
                raise InvalidInputError(f"stage {number} of the recipe changes {', '.join(changed)}: every stage "
                                        f"keeps the data, validation split and backbone of the first")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Reads a recipe file (a TrainConfig file, such as `train_config.json` or `tfr tune`'s, is one stage)."""
        values = _read_config_file(path)
        if not isinstance(values, dict):
            raise InvalidInputError(f"{path}: a recipe file holds a JSON object (TrainConfig fields, and \"then\")")
        then = values.pop("then", [])
        if not isinstance(then, list) or not all(isinstance(changes, dict) for changes in then):
            raise InvalidInputError(f"{path}: \"then\" must be a list of changes, one object per later stage")
        stages = [TrainConfig.from_dict(values)]
        for changes in then:
            stages.append(with_changes(stages[-1], changes))
        return cls(tuple(stages))

    def with_changes(self, changes: dict[str, Any], stages: int | None = None) -> Recipe:
        """The first `stages` stages (default all), each with `changes` (e.g. command-line flags) applied; `weights`
        only to the first: the others start from the trunk of the stage before them."""
        if stages is not None and not 1 <= stages <= len(self.stages):
            raise InvalidInputError(f"the recipe has {len(self.stages)} stage(s): stages must be in "
                                    f"1..{len(self.stages)}, got {stages}")
        later = {name: value for name, value in changes.items() if name != "weights"}
        kept = self.stages[:stages]
        return Recipe((with_changes(kept[0], changes), *(with_changes(stage, later) for stage in kept[1:])))


#: Named training recipes shipped with the package (`tf_retrieval/recipes/<name>.json`): each gives the best recorded
#: figure on the protocol it is named after (tests/test_config.py pins them to benchmarks/results/retrieval.json), so
#: `tfr train --recipe cifar10-2` reproduces that record.
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_names() -> list[str]:
    """The names of the shipped training recipes."""
    return sorted(os.path.splitext(name)[0] for name in os.listdir(RECIPES_DIR) if name.endswith(".json"))


def load_recipe(name: str) -> Recipe:
    """The shipped training recipe `name` (see `recipe_names`), or the recipe file at path `name`."""
    if name.endswith(".json") and os.path.isfile(name):
        return Recipe.load(name)
    if name not in recipe_names():
        raise MissingError(f"no training recipe {name!r}; recipes: {', '.join(recipe_names())} (or a recipe file)")
    return Recipe.load(os.path.join(RECIPES_DIR, f"{name}.json"))


def load_run(run_dir: str) -> tuple[TrainConfig, ModelConfig]:
    """The training and model configs of a finished run."""
    model_path = os.path.join(run_dir, "model.json")
    if not os.path.exists(model_path):
        raise MissingError(f"{run_dir} holds no finished training run (no model.json); train with `tfr train`")
    return TrainConfig.load(os.path.join(run_dir, "train_config.json")), ModelConfig.load(model_path)


def trunk_runs(weights: str | None) -> Iterator[str]:
    """The finished runs (folders with a `result.json`) that starting `weights` come from, newest first: the run that
    wrote them, then the run whose trunk that one started from, and so on. Nothing for ImageNet or unknown weights."""
    seen = set()
    while weights and os.path.isfile(weights):
        run_dir = os.path.dirname(os.path.abspath(weights))
        if run_dir in seen or not os.path.isfile(os.path.join(run_dir, "result.json")):
            return
        seen.add(run_dir)
        yield run_dir
        weights = TrainConfig.load(os.path.join(run_dir, "train_config.json")).model.weights


def best_run(runs_dir: str, *, protocol_prefix: str = "", hashing: bool | None = None) -> str | None:
    """The best finished run under `runs_dir` (a folder of run directories) whose protocol starts with
    `protocol_prefix` (and whose model hashes, or not, when `hashing` is given). Runs on the whole training set of
    their dataset ("-2" protocols such as cifar10-2) come first, then the highest best validation MAP@R (its
    `result.json`: never a test figure), then the newest. A final fit, which held out no validation split, counts
    with the score of the run whose trunk it trained on (so, newer, it comes before that run). None when there is
    none."""
    candidates = []
    for path in glob.glob(os.path.join(runs_dir, "*", "model.json")):
        run_dir = os.path.dirname(path)
        try:
            train_config, model_config = load_run(run_dir)
        except (ValueError, OSError):
            continue  # an unfinished or foreign folder
        if train_config.protocol.startswith(protocol_prefix) and (hashing is None
                                                                  or bool(model_config.hash_bits) == hashing):
            candidates.append((train_config.protocol.endswith("-2"), _validation_score(run_dir),
                               os.path.getmtime(path), run_dir))
    return max(candidates)[-1] if candidates else None


def _validation_score(run_dir: str) -> float:
    """A finished run's best validation MAP@R (`result.json`); for a final fit (validation_fraction 0) that of the
    run whose fine-tuned trunk it trained on; -inf when it is missing or not a number."""
    score = read_json_value(os.path.join(run_dir, "result.json"), "best_map_at_r", float, float("-inf"))
    if math.isfinite(score):
        return score
    try:
        config = TrainConfig.load(os.path.join(run_dir, "train_config.json"))
    except (ValueError, OSError):
        return float("-inf")
    trunk_run = next(trunk_runs(config.model.weights), None)
    return _validation_score(trunk_run) if config.validation_fraction == 0 and trunk_run else float("-inf")
