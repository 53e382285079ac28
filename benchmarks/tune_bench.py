"""Tune the Siamese head (embedding size, margin, learning rate, mining, hidden width) with keras-tuner, and weigh
each embedding size's validation MAP@R against the memory and query latency of an index of that size.

Writes benchmarks/results/tuning-<protocol>.json/.md/.png, and tuning.json / tuning.md over all tuned protocols (one object: dataset, protocol, trials [embedding_dim, margin, learning_rate,
mining, MAP@R, index_ms_per_query, index_mb, ...], best, seconds, command, machine, versions), tuning.md and tuning.png.
The search state lives under <workdir>/tuning/bench-<protocol>: re-running resumes it (more --trials extend it).

    python benchmarks/tune_bench.py                                        # flowers-disjoint, EfficientNet-Lite0 96 px
    python benchmarks/tune_bench.py --protocol cifar10-1 --trials 20
    python benchmarks/tune_bench.py --database-size 1000000                # index cost at a million images
    python benchmarks/tune_bench.py --synthetic --trials 2 --epochs 2      # smoke test; writes under <workdir>, not results/

Data as in evaluate_baselines.py: CIFAR-10 through tfds (TFDS_DATA_DIR), Oxford Flowers 102 through FLOWERS_DIR, the
image folder beside TFDS_DATA_DIR, or tfds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time

import numpy as np

from tf_retrieval.config import PREPROCESSINGS
from tf_retrieval.storage import atomic_write, write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def synthetic_features(seed: int = 0, classes: int = 24, per_class: int = 30, dim: int = 64):
    """Class signal in 8 dimensions under a stronger class-independent nuisance in the rest (as the tests' features):
    a learned projection retrieves far better than the raw vectors."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, 8)) * 3.0
    signal = centres[labels] + rng.normal(scale=0.5, size=(len(labels), 8))
    nuisance = rng.normal(scale=2.0, size=(len(labels), dim - 8))
    return np.concatenate([signal, nuisance], 1).astype(np.float32), labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="flowers-disjoint")
    parser.add_argument("--source", help="dataset of the protocol (default: as evaluate_baselines.py)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--pooling", default="avg")
    parser.add_argument("--preprocessing", choices=PREPROCESSINGS,
                        help="input normalisation (default: the backbone's own; tfr's --preprocessing)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--algorithm", default="bayesian", choices=("bayesian", "random", "hyperband"))
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial at most (early stopping: --patience)")
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the training classes (>= 20 classes) or images held out for MAP@R")
    parser.add_argument("--database-size", type=int,
                        help="vectors in the index whose cost is measured (default: the protocol's database)")
    parser.add_argument("--index-backend", default="auto", choices=("auto", "exact", "scann"))
    parser.add_argument("--workdir", default=os.environ.get("TFR_WORKDIR", "artifacts"))
    parser.add_argument("--results-dir", help="where tuning.json/.md/.png go (default benchmarks/results; with "
                                              "--synthetic <workdir>/tuning/bench-synthetic/results)")
    parser.add_argument("--overwrite", action="store_true", help="restart the search instead of resuming it")
    parser.add_argument("--synthetic", action="store_true", help="synthetic features instead of a dataset (smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("absl", "tf_retrieval.training.train", "tf_retrieval.search.index"):  # one line per trial, not per epoch
        logging.getLogger(name).setLevel(logging.WARNING)

    import keras_tuner
    import tensorflow as tf

    from tf_retrieval.config import ModelConfig, TrainConfig
    from tf_retrieval.evaluation.evaluate import machine_description
    from tf_retrieval.tuning.tune import tune

    start = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    base = TrainConfig(protocol=args.protocol, model=ModelConfig(name="finetuned", backbone=args.backbone,
                                                                 image_size=args.image_size, pooling=args.pooling,
                                                                 preprocessing=args.preprocessing),
                       epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                       patience=args.patience, validation_fraction=args.validation_fraction)
    if args.synthetic:
        inputs, labels = synthetic_features()
        base.classes_per_batch, base.images_per_class = 8, 4
        dataset, database_size, feature_seconds = "synthetic (24 classes x 30, 64-d nuisance features)", len(inputs), 0.0
        name = "bench-synthetic"
    else:
        from evaluate_baselines import flowers_source

        from tf_retrieval.data.protocols import dataset_family, load_protocol
        from tf_retrieval.training.train import cache_inputs

        family = dataset_family(args.protocol)
        base.source = args.source or (flowers_source() if family == "flowers" else None)
        protocol = load_protocol(base.protocol, base.source)
        t0 = time.perf_counter()
        features = cache_inputs(base, protocol.collection, workdir=args.workdir)
        feature_seconds = time.perf_counter() - t0
        inputs, labels = features[protocol.train], protocol.collection.labels[protocol.train]
        source = base.source or ("cifar10" if family == "cifar10" else "oxford_flowers102")
        dataset, database_size = os.path.basename(os.path.normpath(source)), len(protocol.database)
        name = f"bench-{args.protocol}"
        logging.info("%s; training set %d images", protocol.summary(), len(inputs))
    database_size = args.database_size or database_size
    out = os.path.join(args.workdir, "tuning", name)
    results_dir = args.results_dir or (os.path.join(out, "results") if args.synthetic else RESULTS)
    title = f"{dataset}, {args.protocol}" + ("" if args.synthetic else f", {args.backbone} {args.image_size} px")
    result = tune(base, inputs, labels, out, trials=args.trials, algorithm=args.algorithm,
                  database_size=database_size, index_backend=args.index_backend, overwrite=args.overwrite,
                  title=f"{title}: {args.algorithm} search")

    best = dict(max(result.trials, key=lambda r: r["MAP@R"]), config=result.best_config.to_dict())
    with open(os.path.join(out, "trials.json")) as f:
        backend = ", ".join(json.load(f)["index_backend"])
    record = {
        "dataset": dataset, "protocol": args.protocol, "backbone": args.backbone, "image_size": args.image_size,
        "pooling": args.pooling, "algorithm": args.algorithm, "train_images": int(len(inputs)),
        "database_size": int(database_size), "index_backend": backend,
        "trials": result.trials, "best": best, "seconds": round(time.perf_counter() - start, 1),
        "tune_seconds": round(result.seconds, 1), "feature_seconds": round(feature_seconds, 1), "command": command,
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "versions": {"tensorflow": tf.__version__, "keras_tuner": keras_tuner.__version__,
                     "python": platform.python_version()},
        "notes": "MAP@R = best epoch's leave-one-out MAP@R on the validation split held out of the training set "
                 "(whole classes when there are >= 20, else a stratified share); index cost measured once per "
                 "embedding size on random unit vectors (saved size; median single-query latency, k=10)"}
    stem = os.path.join(results_dir, f"tuning-{args.protocol}")
    write_json(stem + ".json", record, indent=1)
    with open(result.table_path) as f:
        table = f.read()
    write_text(stem + ".md", table + f"\nBest configuration (`tfr train --config`): "
               f"`{json.dumps(best['config'], sort_keys=True)}`\n\n{record['machine']}; TF {tf.__version__}, keras-tuner "
               f"{keras_tuner.__version__}; {record['date']}; {record['seconds']} s in all\n\n    {command}\n")
    with open(result.plot_path, "rb") as src, atomic_write(stem + ".png", "wb") as dst:
        dst.write(src.read())
    combine(results_dir)
    print(f"best validation MAP@R {result.best_score:.4f} ({best['embedding_dim']}-d); results in {results_dir}")
    return 0


def combine(results_dir: str) -> None:
    """tuning.json / tuning.md over every tuned protocol (tuning-<protocol>.json): the CIFAR-10 record (else the first)
    at the top level, as the results schema wants one object, and every record under "datasets"."""
    import glob

    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "tuning-*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    top = next((r for r in records if r["protocol"].startswith("cifar10")), records[0])
    write_json(os.path.join(results_dir, "tuning.json"), {**top, "datasets": records}, indent=1)
    parts = ["# Tuning the embedding size (keras-tuner)", ""]
    for r in records:
        with open(os.path.join(results_dir, f"tuning-{r['protocol']}.md")) as f:
            parts += [f"## {r['protocol']} ({r['dataset']})", "", f"![tuning](tuning-{r['protocol']}.png)", "", f.read()]
    write_text(os.path.join(results_dir, "tuning.md"), "\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
