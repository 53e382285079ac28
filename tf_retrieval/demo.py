"""The one-command demo: CIFAR-10 indexed with the frozen baseline and a fine-tuned model, side by side.

`prepare_demo` builds (once) an index bundle of the first `limit` CIFAR-10 train images for the baseline and for a
fine-tuned model: a given training run, else the best cifar10-2 run under `<workdir>/runs`, else a small head that it
trains on the demo's cached features (a minute or two on 2 cores, with a progress bar). Bundles that already hold the
demo's images are reused, so a second start takes seconds.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import numpy as np

from tf_retrieval.config import ModelConfig, TrainConfig
from tf_retrieval.data.images import ImageCollection, load_tfds
from tf_retrieval.data.protocols import Protocol
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.search.engine import RetrievalEngine, index_collection

logger = logging.getLogger(__name__)

#: The head the demo trains when no run exists: small and quick, still clearly better than the baseline on CIFAR-10;
#: the triplet loss with the CosFace term, the best head-only recipe on cifar10-2 (docs/training.md).
DEMO_TRAINING = dict(embedding_dim=128, hidden_dim=512, classes_per_batch=10, images_per_class=16, epochs=12,
                     steps_per_epoch=60, patience=4, learning_rate=1e-3, validation_fraction=0.2, proxy_loss="cosface")


def demo_database(limit: int, data_dir: str | None = None) -> ImageCollection:
    """The first `limit` images of the CIFAR-10 train split."""
    if limit < 1:
        raise InvalidInputError(f"--limit must be positive, got {limit}")
    database = load_tfds("cifar10", data_dir=data_dir, splits=["train"])
    return database.subset(np.arange(min(limit, len(database))))


def demo_engine(config: ModelConfig, database: ImageCollection, *, workdir: str, data_dir: str | None = None,
                batch_size: int = 64, runtime: str = "litert", say: Callable[[str], None] = print) -> RetrievalEngine:
    """The engine of `config` over `database`: the bundle `<workdir>/indexes/demo-<name>` if it holds exactly these
    images with this model, else a new one (embedding the images in `runtime`, backbone outputs cached)."""
    bundle = os.path.join(workdir, "indexes", f"demo-{config.name}")
    if os.path.exists(os.path.join(bundle, "catalog.json")):
        try:
            engine = RetrievalEngine.load(bundle, data_dir=data_dir, runtime=runtime)
            if engine.config.model_id() == config.model_id() and engine.collection.ids == database.ids:
                say(f"using the index at {bundle}")
                return engine
            say(f"rebuilding {bundle}: it holds other images or another model than the demo asks for")
        except (ValueError, OSError, KeyError) as exc:  # a damaged or partial bundle (MissingError is an OSError)
            say(f"rebuilding {bundle}: {exc}")
    say(f"indexing {len(database):,} CIFAR-10 train images with {config.model_id()} ...")
    return index_collection(database, config, bundle, source="cifar10", data_dir=data_dir, workdir=workdir,
                            batch_size=batch_size, runtime=runtime)


def train_demo_head(base: ModelConfig, database: ImageCollection, *, workdir: str, verbose: int = 1,
                    runtime: str = "litert") -> ModelConfig:
    """Trains a triplet-loss head (`DEMO_TRAINING`) on the cached backbone features of `database` and returns the
    fine-tuned model; the run is `<workdir>/runs/demo-finetuned`, found again by the next demo."""
    from tf_retrieval.training.train import train

    config = TrainConfig(protocol="cifar10-2", model=dataclasses.replace(base, name="finetuned", head=None),
                         **DEMO_TRAINING)
    everything = np.arange(len(database))
    protocol = Protocol("cifar10-2", database, train=everything, database=everything, queries=None)
    result = train(config, os.path.join(workdir, "runs", "demo-finetuned"), workdir=workdir, protocol=protocol,
                   verbose=verbose, runtime=runtime)
    return result.model_config


def finetuned_model(base: ModelConfig, database: ImageCollection, *, workdir: str, run_dir: str | None = None,
                    train_if_missing: bool = True, runtime: str = "litert",
                    say: Callable[[str], None] = print) -> ModelConfig | None:
    """The demo's fine-tuned model: of `run_dir`, else of the best finished cifar10-2 float-embedding run under
    `<workdir>/runs` (`config.best_run`; cifar10-1 and cifar10-unseen runs trained on CIFAR-10 test images, which the
    demo queries with), else (with `train_if_missing`) a head trained now on the baseline's features."""
    from tf_retrieval.config import best_run, load_run

    if run_dir:
        return load_run(run_dir)[1]
    found = best_run(os.path.join(workdir, "runs"), protocol_prefix="cifar10-2", hashing=False)
    if found:
        return load_run(found)[1]
    if not train_if_missing:
        return None
    say(f"no fine-tuned CIFAR-10 model yet: training a triplet-loss head on the {len(database):,} demo images ...")
    return train_demo_head(base, database, workdir=workdir, runtime=runtime)


def prepare_demo(base: ModelConfig, *, workdir: str, limit: int = 10000, data_dir: str | None = None,
                 run_dir: str | None = None, finetuned: bool = True, flip: bool | None = None, batch_size: int = 64,
                 runtime: str = "litert", say: Callable[[str], None] = print) -> dict[str, RetrievalEngine]:
    """{model name: engine} over the first `limit` CIFAR-10 train images: the baseline `base`, then (unless
    `finetuned` is False) the fine-tuned model of `finetuned_model`. Both embed with test-time flip if `flip` is
    True, both without if it is False; None: both as the fine-tuned model has it (else as `base` has it)."""
    database = demo_database(limit, data_dir)
    models = [base]
    if finetuned:
        models.append(finetuned_model(base, database, workdir=workdir, run_dir=run_dir, runtime=runtime, say=say))
        if models[1].name == base.name:
            raise InvalidInputError(f"the fine-tuned model is named {base.name!r} like the baseline: rename one")
    flip = models[-1].flip if flip is None else flip  # side by side on the same views
    return {model.name: demo_engine(dataclasses.replace(model, flip=flip), database, workdir=workdir,
                                    data_dir=data_dir, batch_size=batch_size, runtime=runtime, say=say)
            for model in models}


def demo_query(engines: dict[str, RetrievalEngine], *, k: int = 10, seed: int = 0, data_dir: str | None = None,
               say: Callable[[str], None] = print) -> None:
    """Searches every engine with one random CIFAR-10 test image and prints the neighbours."""
    queries = load_tfds("cifar10", data_dir=data_dir, splits=["test"])
    position = int(np.random.default_rng(seed).integers(len(queries)))
    label = int(queries.labels[position])
    say(f"query: CIFAR-10 test image {queries.ids[position]} (class {queries.class_names[label]})")
    for name, engine in engines.items():
        results = engine.search_images([queries.read_bytes(position)], k)[0]
        hits = sum(result.label == label for result in results)
        say(f"{name}: {hits}/{len(results)} neighbours share the query's class")
        for rank, result in enumerate(results, 1):
            say(f"  {rank:3d}. {result.score:7.4f}  {result.class_name:<12s} {result.id}")
