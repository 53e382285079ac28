"""Embedding throughput: the full pipeline (encoded images -> tf.data decode/resize -> backbone) against raw `model.predict`
on the same images already decoded and resized in memory. Goal: the pipeline reaches >= 90% of raw.

Writes benchmarks/results/throughput.json and throughput.md.

    python benchmarks/throughput.py --images 4096 --sizes 96 160
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

import numpy as np

from tf_retrieval.storage import write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10", help="tfds name or image folder (default cifar10, test split)")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tf_retrieval.models.backbones import build_backbone
    from tf_retrieval.data.images import load_dataset, load_tfds
    from tf_retrieval.evaluation.evaluate import machine_description
    from tf_retrieval.features.cache import extract_features

    if os.path.isdir(args.dataset):
        collection = load_dataset(args.dataset)
    else:
        collection = load_tfds(args.dataset, splits=["test"])
    collection = collection.subset(np.arange(min(args.images, len(collection))))
    weights = None if args.weights == "none" else args.weights
    runs = []
    for size in args.sizes:
        model = build_backbone(args.backbone, size, "avg", weights)
        pixels = np.concatenate([batch.numpy() for batch in collection.as_dataset(size, 256)])  # decoded up front, untimed
        model.predict(pixels[:args.batch_size], batch_size=args.batch_size, verbose=0)  # warm-up
        extract_features(collection.subset(np.arange(args.batch_size)), model, image_size=size,
                         batch_size=args.batch_size, progress=False)
        raw = pipeline = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.predict(pixels, batch_size=args.batch_size, verbose=0)
            raw = min(raw, time.perf_counter() - start)
            start = time.perf_counter()
            extract_features(collection, model, image_size=size, batch_size=args.batch_size, progress=False)
            pipeline = min(pipeline, time.perf_counter() - start)
        runs.append({"image_size": size, "images": len(collection), "batch": args.batch_size,
                     "raw_predict_img_s": round(len(collection) / raw, 1),
                     "pipeline_img_s": round(len(collection) / pipeline, 1),
                     "pipeline_over_raw": round(raw / pipeline, 3)})
        print(runs[-1], flush=True)
        tf.keras.backend.clear_session()
    result = {"backbone": args.backbone, "weights": args.weights, "dataset": f"{args.dataset} (test split, encoded)",
              "runs": runs, "machine": machine_description(), "tensorflow": tf.__version__,
              "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
              "notes": "raw = keras model.predict on pre-decoded, pre-resized float32 pixels in memory; pipeline = "
                       "tf_retrieval.features.cache.extract_features from encoded JPEG bytes (PIL decode + resize in tf.data), "
                       "best of --repeats runs each"}
    write_json(os.path.join(RESULTS, "throughput.json"), result, indent=1)
    lines = ["# Embedding throughput", "", f"{args.backbone} ({args.weights}), {result['dataset']}, {result['machine']}, "
             f"TF {tf.__version__}, {result['date']}", "", "| px | images | batch | raw predict img/s | pipeline img/s | "
             "pipeline / raw |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['image_size']} | {r['images']} | {r['batch']} | {r['raw_predict_img_s']} | {r['pipeline_img_s']} | "
              f"{r['pipeline_over_raw']:.2f} |" for r in runs]
    lines += ["", result["notes"], "", f"    {result['command']}", ""]
    write_text(os.path.join(RESULTS, "throughput.md"), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
