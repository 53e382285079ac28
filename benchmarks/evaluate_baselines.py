"""Baseline retrieval quality of frozen backbones on the evaluation protocols (DESIGN.md §2).

Writes records into benchmarks/results/retrieval.json (merged by key) and the Markdown table benchmarks/results/retrieval.md.
Features are cached under the work directory, so re-running is cheap.

Data: CIFAR-10 through tfds (set TFDS_DATA_DIR to prepared data when offline); Oxford Flowers 102 through tfds, or through an
image folder with an index.csv (FLOWERS_DIR; default: `oxford_flowers102_subset` beside TFDS_DATA_DIR when it exists).

    python benchmarks/evaluate_baselines.py                       # EfficientNet-Lite0 ImageNet, 96 and 160 px, avg and GeM
    python benchmarks/evaluate_baselines.py --random-backbones    # + DenseNet121 / ResNet50 with random weights
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

from tf_retrieval.config import PREPROCESSINGS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def flowers_source() -> str:
    """FLOWERS_DIR, else the flowers image folder beside TFDS_DATA_DIR, else tfds `oxford_flowers102`."""
    if os.environ.get("FLOWERS_DIR"):
        return os.environ["FLOWERS_DIR"]
    tfds_dir = os.environ.get("TFDS_DATA_DIR")
    if tfds_dir:
        folder = os.path.join(os.path.dirname(os.path.abspath(tfds_dir)), "oxford_flowers102_subset")
        if os.path.isdir(folder):
            return folder
    return "oxford_flowers102"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none (random), or a weights file")
    parser.add_argument("--preprocessing", choices=PREPROCESSINGS,
                        help="input normalisation (default: the backbone's own; tfr's --preprocessing)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    parser.add_argument("--poolings", nargs="+", default=["avg", "gem"])
    parser.add_argument("--protocols", nargs="+",
                        default=["cifar10-2", "cifar10-1", "cifar10-unseen", "flowers-disjoint", "flowers-official"])
    parser.add_argument("--random-backbones", action="store_true",
                        help="also DenseNet121 and ResNet50 with random weights (96 px, avg) on the same protocols")
    parser.add_argument("--random-only", action="store_true", help="only the random-weight backbones")
    parser.add_argument("--workdir", default=os.environ.get("TFR_WORKDIR", "artifacts"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runtime", choices=("tf", "litert", "litert-fp16"), default="tf",
                        help="where the backbone runs (default tf: the recorded baselines ran there)")
    parser.add_argument("--results", default=RESULTS, help="folder of retrieval.json / retrieval.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tf_retrieval.config import ModelConfig
    from tf_retrieval.data.images import load_dataset
    from tf_retrieval.evaluation.evaluate import RECORD_KEY, evaluate_protocol, make_record, write_records_markdown
    from tf_retrieval.features.embedding import embed_collection
    from tf_retrieval.data.protocols import dataset_family, make_protocol
    from tf_retrieval.storage import RecordStore

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    configs = [] if args.random_only else [
        ModelConfig(backbone=args.backbone, image_size=size, pooling=pooling, preprocessing=args.preprocessing,
                    weights=None if args.weights == "none" else args.weights)
        for size in args.sizes for pooling in args.poolings]
    if args.random_backbones or args.random_only:
        configs += [ModelConfig(backbone=name, image_size=96, pooling="avg", weights=None)
                    for name in ("densenet121", "resnet50")]
    sources = {"cifar10": "cifar10", "flowers": flowers_source()}
    collections = {}
    records = []
    store = RecordStore(os.path.join(args.results, "retrieval.json"), RECORD_KEY)
    for config in configs:
        for family in ("cifar10", "flowers"):
            names = [p for p in args.protocols if dataset_family(p) == family]
            if not names:
                continue
            if family not in collections:
                collections[family] = load_dataset(sources[family])
            collection = collections[family]
            start = time.perf_counter()
            features = embed_collection(collection, config, workdir=args.workdir, batch_size=args.batch_size,
                                        runtime=args.runtime)
            extract_seconds = time.perf_counter() - start
            for name in names:
                protocol = make_protocol(name, collection)
                logging.info("%s with %s", protocol.summary(), config.model_id())
                t0 = time.perf_counter()
                metrics, curve, dim = evaluate_protocol(protocol, features, progress=True)
                record = make_record(name, config, metrics, embedding_dim=dim,
                                     seconds=time.perf_counter() - t0, command=command,
                                     dataset=sources[family] if family == "cifar10" else os.path.basename(sources[family]),
                                     feature_seconds=round(extract_seconds, 1), images=len(collection),
                                     runtime=args.runtime,
                                     queries=int(metrics["queries"]), pr_curve=curve)
                records.append(record)
                logging.info("%s: %s", name, {k: metrics[k] for k in ("mAP", "MAP@R", "R@1")})
                merged = store.merge([record])
                write_records_markdown(store.path, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
