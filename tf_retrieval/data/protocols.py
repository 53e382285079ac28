"""Evaluation protocols (DESIGN.md §2): which images train a head, which form the database, which are the queries.

A protocol holds positions into one collection, so features extracted once for the whole collection serve every protocol.
Relevance is always "same class label".
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from tf_retrieval.errors import InvalidInputError
from tf_retrieval.data.images import ImageCollection, load_dataset, load_tfds

PROTOCOLS = {
    "cifar10-2": "queries = the 10,000 test images; database = training set = the 50,000 train images; mAP@all",
    "cifar10-1": "queries = 1,000 test images (100 per class); database = the other 59,000; "
                 "training set = 5,000 database images (500 per class); mAP@all",
    "cifar10-unseen": "head trained on the train images of classes 0-7; queries = test images of classes 8-9, "
                      "database = train images of classes 8-9",
    "flowers-official": "training set = database = official train + validation; queries = official test; mAP@all",
    "flowers-disjoint": "head trained on classes 0-50; every image of classes 51-101 is a query against all the others; "
                        "Recall@1/2/4/8 and MAP@R",
}
DEFAULT_SOURCES = {"cifar10": "cifar10", "flowers": "oxford_flowers102"}


@dataclasses.dataclass
class Protocol:
    """Positions into `collection`. `queries is None` means leave-one-out: each database image queries all the others."""

    name: str
    collection: ImageCollection
    train: np.ndarray
    database: np.ndarray
    queries: np.ndarray | None

    @property
    def description(self) -> str:
        return PROTOCOLS[self.name]

    @property
    def class_disjoint(self) -> bool:
        """Whether the database holds only classes the training set does not (retrieval of unseen classes): such a
        protocol validates on whole training classes held out."""
        labels = self.collection.labels
        return not np.isin(labels[self.database], labels[self.train]).any()

    @property
    def leave_one_out(self) -> bool:
        return self.queries is None

    def summary(self) -> str:
        queries = "each database image (leave-one-out)" if self.queries is None else f"{len(self.queries):,} queries"
        return f"{self.name}: {queries}, database {len(self.database):,}, train {len(self.train):,}"


def dataset_family(protocol: str) -> str:
    """"cifar10" or "flowers": which collection a protocol runs on."""
    if protocol not in PROTOCOLS:
        raise InvalidInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol.split("-")[0]


#: Protocols whose split is drawn at random (by `make_protocol`'s seed; training always draws with seed 0).
SEEDED_PROTOCOLS = ("cifar10-1",)


def make_protocol(name: str, collection: ImageCollection, *, seed: int = 0) -> Protocol:
    """Splits `collection` (CIFAR-10 with train/test splits, or Oxford Flowers 102 with train/validation/test) by protocol `name`.

    Raises:
      ValueError: unknown protocol, or a collection without the splits or classes the protocol needs (one that gives
        no database or no queries, as cifar10-unseen on a collection without classes 8 and 9).
    """
    protocol = _split(name, collection, seed)
    empty = [part for part in ("database", "queries") if getattr(protocol, part) is not None
             and not len(getattr(protocol, part))]
    if empty:
        raise InvalidInputError(f"{name}: {collection.name} gives no {' and no '.join(empty)} images "
                                f"({PROTOCOLS[name]}); is it the right collection?")
    return protocol


def _split(name: str, collection: ImageCollection, seed: int) -> Protocol:
    family = dataset_family(name)
    labels, splits = collection.labels, collection.splits
    if family == "cifar10":
        _require_splits(collection, name, ("train", "test"))
        train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
        if name == "cifar10-2":
            return Protocol(name, collection, train=train, database=train, queries=test)
        if name == "cifar10-1":
            rng = np.random.default_rng(seed)
            queries = np.sort(np.concatenate([_sample(rng, test[labels[test] == c], 100) for c in np.unique(labels)]))
            database = np.setdiff1d(np.arange(len(collection)), queries)
            training = np.sort(np.concatenate([_sample(rng, database[labels[database] == c], 500) for c in np.unique(labels)]))
            return Protocol(name, collection, train=training, database=database, queries=queries)
        unseen = np.isin(labels, [8, 9])
        return Protocol(name, collection, train=train[~unseen[train]], database=train[unseen[train]],
                        queries=test[unseen[test]])
    if name == "flowers-official":
        _require_splits(collection, name, ("train", "validation", "test"))
        database = np.flatnonzero(np.isin(splits, ["train", "validation"]))
        return Protocol(name, collection, train=database, database=database, queries=np.flatnonzero(splits == "test"))
    seen = labels <= 50
    if not seen.any() or seen.all():
        raise InvalidInputError(f"{name}: needs images of classes 0-50 and 51-101; {collection.name} has labels "
                         f"{labels.min()}..{labels.max()}")
    return Protocol(name, collection, train=np.flatnonzero(seen), database=np.flatnonzero(~seen), queries=None)


SPLITS = {"cifar10": ["train", "test"], "flowers": ["train", "validation", "test"]}


def load_protocol(name: str, source: str | None = None, data_dir: str | None = None, seed: int = 0) -> Protocol:
    """Loads the protocol's collection (default: tfds `cifar10` / `oxford_flowers102`, or `source`) and splits it."""
    family = dataset_family(name)
    source = source or DEFAULT_SOURCES[family]
    if os.path.isdir(source) or source.startswith("folder:"):
        collection = load_dataset(source, data_dir=data_dir)
    else:  # a tfds dataset: exactly the splits the protocol uses
        collection = load_tfds(source, data_dir=data_dir, splits=SPLITS[family])
    return make_protocol(name, collection, seed=seed)


def _sample(rng: np.random.Generator, positions: np.ndarray, count: int) -> np.ndarray:
    return rng.choice(positions, size=min(count, len(positions)), replace=False)


def _require_splits(collection: ImageCollection, name: str, needed: tuple[str, ...]) -> None:
    missing = [s for s in needed if s not in set(collection.splits.tolist())]
    if missing:
        raise InvalidInputError(f"{name}: collection {collection.name} has no {'/'.join(missing)} split "
                         f"(it has {sorted(set(collection.splits.tolist()))})")
