"""Adapt a model's vectors to a collection: fusion of the frozen features (optionally PCA-whitened, fitted on the
collection without labels) with a trained head.

On classes a head was not trained on, the head alone loses ImageNet's generic structure, which the frozen features
keep. Concatenating the frozen unit vector with the head's embedding, weighted `sqrt(1 - w)` and `sqrt(w)`, ranks by
`(1 - w) * cos_frozen + w * cos_head`. The frozen features may first be whitened (L2 -> centre -> project on the top
`dim` principal axes, each divided by its standard deviation -> L2; Jegou & Chum 2012, as in Radenovic et al.'s GeM
pipeline): that evens out a few dominant directions and helps collections of many classes (flowers), but hurts when a
few classes make the dominant directions (2 CIFAR-10 classes lose a third of their MAP@R). Whether to whiten (and to
how many dimensions) is chosen on the protocol's training set with the frozen features alone, and the weight `w` on the
training run's own validation split (held-out training classes for a class-disjoint protocol): never on the queries.
The whitening itself is fitted on the database without labels, as a deployed index would fit it on its collection;
in a leave-one-out protocol (flowers-disjoint) the database is the query set, so that fit is transductive (the
record's `fitted_on` says so).

The adapted model is an ordinary `ModelConfig` whose head is a Keras model on the backbone's pooled features, so the
index, the page, the export and the evaluation take it unchanged. Float models with a frozen backbone only (a baseline
or a head-only run): the fusion needs the frozen features.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from tf_retrieval.config import ModelConfig, load_run
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.storage import save_with_digest, write_json
from tf_retrieval.vectors import l2_normalize

#: Fusion weights tried when the head weight is chosen on validation data.
HEAD_WEIGHTS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
#: Whitened sizes and shrinkages tried when the frozen branch is chosen on the training set.
WHITEN_DIMS = (32, 64, 128, 256)
SHRINKAGES = (1.0, 10.0)
#: File written beside an adapted model's model.json: how it was made.
ADAPT_FILE = "adapt.json"


def fit_whitening(features: np.ndarray, dim: int | None = None, shrinkage: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitening of unit-length `features` [n, d]: (mean [d], projection [d, k]), k = min(dim, d, n - 1).

    Each kept axis is divided by sqrt(variance + shrinkage * mean kept variance): `shrinkage` keeps the noisy axes of
    small variance from being blown up (0: plain whitening)."""
    vectors = l2_normalize(np.asarray(features, np.float64))
    n, d = vectors.shape
    keep = min(int(dim or d), d, n - 1)
    if keep < 1:
        raise InvalidInputError(f"whitening needs at least 2 vectors and dim >= 1 (got {n} vectors, dim={dim})")
    mean = vectors.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov(vectors - mean, rowvar=False))
    order = np.argsort(variances)[::-1][:keep]
    variances, axes = np.maximum(variances[order], 0.0), axes[:, order]
    projection = axes / np.sqrt(variances + shrinkage * variances.mean() + 1e-12)
    return mean.astype(np.float32), projection.astype(np.float32)


def frozen_vectors(features: np.ndarray, whitening: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The frozen branch in numpy (what the adapted head computes): unit `features`, whitened when `whitening` is a
    (mean, projection) pair from `fit_whitening`."""
    unit = l2_normalize(np.asarray(features, np.float32))
    if whitening is None:
        return unit
    mean, projection = whitening
    return l2_normalize((unit - mean) @ projection)


def build_adapted_head(input_dim: int, whitening: tuple[np.ndarray, np.ndarray] | None = None, head=None,
                       head_weight: float = 0.0):
    """features [n, input_dim] -> [frozen branch * sqrt(1 - w), head(features) * sqrt(w)] (unit length).

    The frozen branch is the unit features, whitened with `whitening` (mean, projection) unless it is None. `head`
    is a trained float head (unit-length outputs) or None; w = `head_weight` in [0, 1] (0 or no head: the frozen
    branch alone; 1: the head alone)."""
    import keras

    from tf_retrieval.models.heads import L2Normalize

    if not 0.0 <= head_weight <= 1.0:
        raise InvalidInputError(f"head_weight must be in [0, 1], got {head_weight}")
    features = keras.Input((int(input_dim),), name="features")
    frozen = L2Normalize(name="unit_features")(features)
    if whitening is not None:
        mean, projection = whitening
        layer = keras.layers.Dense(projection.shape[1], name="whitening")
        frozen = L2Normalize(name="whitened")(layer(frozen))
        layer.set_weights([projection, -mean @ projection])
    if head is None or head_weight == 0.0:
        outputs = frozen
    elif head_weight == 1.0:
        outputs = head(features)
    else:
        frozen = keras.layers.Rescaling(float(np.sqrt(1.0 - head_weight)), name="frozen_weight")(frozen)
        trained = keras.layers.Rescaling(float(np.sqrt(head_weight)), name="head_weight")(head(features))
        outputs = keras.layers.Concatenate(name="fused")([frozen, trained])
    return keras.Model(features, outputs, name="adapted_head")


def fused_vectors(frozen: np.ndarray, head_vectors: np.ndarray | None, head_weight: float) -> np.ndarray:
    """numpy twin of the adapted head's output, from the frozen branch's vectors and the head's unit outputs."""
    if head_vectors is None or head_weight == 0.0:
        return frozen
    if head_weight == 1.0:
        return head_vectors
    return np.hstack([np.sqrt(1.0 - head_weight) * frozen, np.sqrt(head_weight) * head_vectors])


def choose_whitening(features: np.ndarray, labels: np.ndarray, whiten: bool | None = None, dims=WHITEN_DIMS,
                     shrinkages=SHRINKAGES, max_images: int = 5000,
                     seed: int = 0) -> tuple[tuple[int, float] | None, dict[str, float]]:
    """The frozen branch with the best leave-one-out MAP@R on labelled `features` (a protocol's training set, at most
    `max_images` of it drawn at random; the whitening is fitted on the same images, as it will be on the database):
    raw unit features, or whitened with one of `dims` x `shrinkages` (`whiten`: True only whitened, False only raw).

    Returns ((dim, shrinkage) or None for raw, {"raw" / "whitened 64-d s=10": MAP@R})."""
    from tf_retrieval.evaluation.evaluate import leave_one_out_map_at_r

    if len(features) > max_images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(features), max_images, replace=False))
        features, labels = features[chosen], labels[chosen]
    candidates = ([None] if whiten is not True else []) + \
        ([(int(d), float(s)) for d in dims for s in shrinkages] if whiten is not False else [])
    scores = {}
    for candidate in candidates:
        whitening = None if candidate is None else fit_whitening(features, *candidate)
        scores[candidate] = round(leave_one_out_map_at_r(frozen_vectors(features, whitening), labels), 4)
    best = max(scores, key=scores.get)
    return best, {_branch_name(k): v for k, v in scores.items()}


def choose_head_weight(frozen: np.ndarray, head_vectors: np.ndarray, labels: np.ndarray,
                       weights=HEAD_WEIGHTS) -> tuple[float, dict[str, float]]:
    """The fusion weight with the best leave-one-out MAP@R on labelled vectors (a validation set the head did not train
    on). Returns (weight, {"w=0.5": MAP@R, ...}); ties go to the smaller weight."""
    from tf_retrieval.evaluation.evaluate import leave_one_out_map_at_r

    scores = {float(w): round(leave_one_out_map_at_r(fused_vectors(frozen, head_vectors, w), labels), 4)
              for w in weights}
    best = max(scores, key=scores.get)
    return best, {f"w={w:g}": v for w, v in scores.items()}


def _branch_name(whitening: tuple[int, float] | None) -> str:
    return "raw" if whitening is None else f"whitened {whitening[0]}-d s={whitening[1]:g}"


def adapt(config: ModelConfig, protocol, out_dir: str, *, whiten: bool | None = None, dim: int | None = None,
          shrinkage: float | None = None, head_weight: float | None = None, run_dir: str | None = None,
          workdir: str | None = None, runtime: str = "litert") -> ModelConfig:
    """Fuses `config`'s frozen features (whitened on `protocol`'s database, or not) with its head and writes the
    adapted model to `out_dir` (model.json, the head, adapt.json). Returns its `ModelConfig`.

    Args:
      config: a float model with a frozen backbone (a baseline, or a head-only training run's model.json).
      protocol: the whitening is fitted on its database (the vectors that get indexed); the choices are made on its
        training set: the frozen branch on all of it (`choose_whitening`), the head weight on the validation split
        that `run_dir`'s training held out (`choose_head_weight`).
      whiten: True / False, or None to choose; `dim` and `shrinkage` given with `whiten=True` are used as they are.
      head_weight: the head's share w in [0, 1]; None chooses it (needs `run_dir`).
      run_dir: the training run `config` comes from.
    """
    from tf_retrieval.features.embedding import backbone_features
    from tf_retrieval.models.heads import load_head
    from tf_retrieval.training.train import run_validation_split

    if config.hash_bits or config.train_from:
        raise InvalidInputError("adapt takes float models with a frozen backbone (a baseline or a head-only run); "
                                f"{config.model_id()} has {'hashing codes' if config.hash_bits else 'a trained trunk'}")
    head = load_head(config.head) if config.head else None
    if head is not None and head_weight is None and run_dir is None:
        raise InvalidInputError("choosing the head weight needs the training run (its validation split); give "
                                "--head-weight or the run's model.json")
    features = backbone_features(protocol.collection, config, workdir=workdir, runtime=runtime)
    train_features, labels = features[protocol.train], protocol.collection.labels[protocol.train]
    choices = {}
    if whiten is False:
        branch = None
    elif whiten and dim and shrinkage is not None:
        branch = (int(dim), float(shrinkage))
    else:
        branch, choices["frozen_branch_map_at_r"] = choose_whitening(train_features, labels, whiten,
                                                                     dims=(dim,) if dim else WHITEN_DIMS,
                                                                     shrinkages=(shrinkage,) if shrinkage is not None
                                                                     else SHRINKAGES)
    if head is None:
        head_weight = 0.0
    elif head_weight is None:
        train_config, _ = load_run(run_dir)
        if not train_config.validation_fraction:
            raise InvalidInputError(f"{run_dir} trained on every training image (validation_fraction 0): it has no "
                                    "validation split to choose the head's weight on; give --head-weight")
        _, val_pos = run_validation_split(train_config, labels, protocol.class_disjoint or None)  # the run's own
        whitening = None if branch is None else fit_whitening(train_features, *branch)
        head_vectors = l2_normalize(head.predict(train_features[val_pos], batch_size=1024, verbose=0))
        head_weight, choices["head_weight_map_at_r"] = choose_head_weight(
            frozen_vectors(train_features[val_pos], whitening), head_vectors, labels[val_pos])
        choices["validation"] = {"images": int(len(val_pos)), "classes": int(len(np.unique(labels[val_pos])))}
    whitening = None if branch is None else fit_whitening(features[protocol.database], *branch)
    adapted = build_adapted_head(features.shape[1], whitening, head, float(head_weight))
    head_path = save_with_digest(adapted.save, out_dir, f"{config.name}-adapted-head", ".keras")
    adapted_config = dataclasses.replace(config, head=head_path)
    adapted_config.save(os.path.join(out_dir, "model.json"))
    write_json(os.path.join(out_dir, ADAPT_FILE), {
        "source_model": config.to_dict(), "run_dir": run_dir and os.path.abspath(run_dir),
        "whiten_dim": None if branch is None else int(whitening[1].shape[1]),
        "shrinkage": None if branch is None else branch[1], "head_weight": float(head_weight),
        "fitted_on": None if branch is None else
        f"{protocol.name} database ({len(protocol.database):,} images of {protocol.collection.name}"
        + ("; leave-one-out: they are the queries, unlabelled)" if protocol.leave_one_out else ")"),
        "choices": choices}, indent=1)
    return adapted_config


def _adaptation(model_config_path: str) -> dict | None:
    """The `ADAPT_FILE` beside a model.json (how `tfr adapt` made that model), or None for another model."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_config_path)), ADAPT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_adapted_features(model_config_path: str, config: ModelConfig) -> None:
    """Refuses `config`, loaded from `model_config_path` and then changed, when that is a model `tfr adapt` made and
    the change gives other backbone features (size, scales, flip, ...): its whitening and head weight were fitted on
    the features of the model it was made from."""
    details = _adaptation(model_config_path)
    if details is None:
        return
    fitted = ModelConfig.from_dict(details["source_model"]).backbone_key()
    if config.backbone_key() != fitted:
        raise InvalidInputError(f"{os.path.dirname(os.path.abspath(model_config_path))} was adapted (whitened, fused) "
                                f"on {fitted} features, not on {config.backbone_key()}: run `tfr adapt` again with "
                                f"these model flags (e.g. --flip)")


def adaptation_details(model_config_path: str) -> dict:
    """What a record says of an adapted model (nothing for another model): its label (baseline or finetuned), its
    variant name and how it was made."""
    details = _adaptation(model_config_path)
    if details is None:
        return {}
    weight, frozen = details["head_weight"], "whitened" if details["whiten_dim"] else "frozen"
    variant = frozen if weight == 0 else ("head" if weight == 1 else f"{frozen} + head (w={weight:g})")
    return {"variant": variant, "adaptation": {k: details[k] for k in ("whiten_dim", "shrinkage", "head_weight",
                                                                        "fitted_on", "choices")},
            "run_dir": details.get("run_dir"),
            "model": "finetuned" if details["source_model"]["head"] and weight > 0 else "baseline"}  # w 0: no head
