"""Embedding throughput, two parts:

1. Feature caching: the full pipeline (encoded images -> threaded decode + numpy resize -> backbone) against raw
   `model.predict` on the same images already decoded and resized in memory. Goal: the pipeline reaches >= 90% of raw.
2. Runtimes of in-process embedding (`features.embedding.Embedder`, the page's and `tfr search`'s path): TensorFlow
   (`tf.function`), LiteRT fp32 and LiteRT in float16 arithmetic (`--runtime litert-fp16`), pixels in and JPEG bytes
   in, at batch 1 and 32; and the machine's limit: a float32 matmul's GFLOP/s on all cores divided by the model's
   FLOPs per image. Goals (issue 15): LiteRT's JPEG pipeline >= 2.5x TensorFlow's at batch 32, >= 5x at batch 1, and
   >= 50% of the limit (given for both LiteRT runtimes; float16 arithmetic is not bound by the float32 limit).

Writes benchmarks/results/throughput.json and throughput.md. Run it on an idle machine (the load average is recorded).

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
    parser.add_argument("--rounds", type=int, default=2,
                        help="fresh processes per runtime, TensorFlow and LiteRT taking turns (a shared host's speed "
                             "drifts over minutes: both runtimes see each stretch); the best row of each is kept")
    parser.add_argument("--runtime-images", type=int, default=512, help="images per timed runtime run (batch 32; "
                                                                        "a quarter of them at batch 1)")
    parser.add_argument("--workdir", default="artifacts", help="where converted LiteRT models are cached")
    parser.add_argument("--runtimes", nargs="+", default=["tf", "litert", "litert-fp16"],
                        help="in-process runtimes to time (tf, the reference of the goals, is always included)")
    parser.add_argument("--precision-size", type=int, default=96,
                        help="image size of the fp32 / fp16 / int8 comparison (0: skip it)")
    parser.add_argument("--cold-index", type=int, default=96, metavar="PX",
                        help="time `tfr index` of the whole dataset from nothing at this size (0: skip it)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    args.matmul_gflop_s = matmul_gflops(repeats=10)  # the machine's limit, measured once, before anything else runs
    print(f"float32 matmul: {args.matmul_gflop_s:.1f} GFLOP/s", flush=True)

    import tensorflow as tf

    from tf_retrieval.config import ModelConfig
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
        pixels = np.concatenate(list(collection.pixel_batches(size, 256)))  # decoded up front, untimed
        model.predict(pixels[:args.batch_size], batch_size=args.batch_size, verbose=0)  # warm-up
        extract_features(collection.subset(np.arange(args.batch_size)), model, image_size=size,
                         batch_size=args.batch_size, progress=False)
        raw = pipeline = float("inf")
        for _ in range(args.repeats):  # each kind of run repeated in a row: alternating them re-warms TensorFlow
            start = time.perf_counter()
            model.predict(pixels, batch_size=args.batch_size, verbose=0)
            raw = min(raw, time.perf_counter() - start)
        for _ in range(args.repeats):
            start = time.perf_counter()
            extract_features(collection, model, image_size=size, batch_size=args.batch_size, progress=False)
            pipeline = min(pipeline, time.perf_counter() - start)
        runs.append({"image_size": size, "images": len(collection), "batch": args.batch_size,
                     "raw_predict_img_s": round(len(collection) / raw, 1),
                     "pipeline_img_s": round(len(collection) / pipeline, 1),
                     "pipeline_over_raw": round(raw / pipeline, 3)})
        print(runs[-1], flush=True)
        tf.keras.backend.clear_session()
    runtimes, limits = [], []
    for size in args.sizes:
        config = ModelConfig(name="baseline", backbone=args.backbone, image_size=size, weights=weights)
        rows, limit = runtime_rows(config, collection, args)
        runtimes += rows
        limits.append(limit)
    precisions = None
    if args.precision_size:
        import concurrent.futures
        import multiprocessing

        config = ModelConfig(name="baseline", backbone=args.backbone, image_size=args.precision_size, weights=weights)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            precisions = pool.submit(precision_report, config, collection).result()
    cold = cold_index_seconds(args.dataset, args.cold_index) if args.cold_index else None
    result = {"backbone": args.backbone, "weights": args.weights, "dataset": f"{args.dataset} (test split, encoded)",
              "runs": runs, "runtimes": runtimes, "machine_limit": limits, "goals": runtime_goals(runtimes, limits),
              "precisions": precisions, "cold_index": cold,
              "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "machine": machine_description(), "tensorflow": tf.__version__,
              "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
              "notes": "raw = keras model.predict on pre-decoded, pre-resized float32 pixels in memory; pipeline = "
                       "tf_retrieval.features.cache.extract_features from encoded JPEG bytes (decode_image: libjpeg-turbo via simplejpeg for plain JPEGs, else PIL; numpy resize; in a thread pool), "
                       "best of --repeats runs each. runtimes: features.embedding.Embedder, one call per batch, "
                       "embed_pixels (pixels in) and embed_bytes (JPEG bytes in: decode_image + numpy resize + model), "
                       "best of --repeats runs, each runtime in a fresh process, --rounds processes per runtime taking turns, the fastest kept; LiteRT fp32 with XNNPACK, one interpreter, threads = "
                       "cores; litert-fp16: the same flatbuffer, XNNPACK's FORCE_FP16 flag (float16 arithmetic) "
                       "through LiteRT's CompiledModel API, threads = cores"}
    write_json(os.path.join(RESULTS, "throughput.json"), result, indent=1)
    lines = ["# Embedding throughput", "", f"{args.backbone} ({args.weights}), {result['dataset']}, {result['machine']}, "
             f"TF {tf.__version__}, {result['date']}", "", "| px | images | batch | raw predict img/s | pipeline img/s | "
             "pipeline / raw |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['image_size']} | {r['images']} | {r['batch']} | {r['raw_predict_img_s']} | {r['pipeline_img_s']} | "
              f"{r['pipeline_over_raw']:.2f} |" for r in runs]
    lines += ["", result["notes"], "", "## In-process embedding by runtime", "",
              "| px | runtime | batch | pixels in, img/s | JPEG bytes in, img/s | ms per batch (JPEG) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['image_size']} | {r['runtime']} | {r['batch']} | {r['model_img_s']} | {r['pipeline_img_s']} | "
              f"{r['pipeline_ms_per_batch']} |" for r in runtimes]
    lines += ["", "Machine limit: float32 matmul on all cores / the model's FLOPs per image:", ""]
    lines += [f"- {m['image_size']} px: {m['matmul_gflop_s']} GFLOP/s / {m['model_gflop_per_image']} GFLOP = "
              f"{m['limit_img_s']} img/s" for m in limits]
    lines += ["", "Goals (LiteRT vs TensorFlow, JPEG bytes in; share of the float32 limit at batch 32):", ""]
    lines += [f"- {g['runtime']}, {g['image_size']} px batch {g['batch']}: {g['over_tf']}x TensorFlow (goal "
              f"{g['goal_over_tf']}x, "
              f"{'met' if g['met_over_tf'] else 'missed'})"
              + (f"; {g['share_of_limit']:.0%} of the limit (goal 50%, {'met' if g['met_limit'] else 'missed'})"
                 if 'share_of_limit' in g else "") for g in result["goals"]]
    if precisions:
        rows = precisions["rows"]
        lines += ["", f"## LiteRT precisions ({precisions['image_size']} px; int8: full-integer, calibrated on "
                  f"{precisions['calibration_images']} images)", "",
                  "| | " + " | ".join(row["precision"] for row in rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for label, key in (("batch 1, img/s (pixels in)", "batch1_img_s"), ("batch 32, img/s (pixels in)", "batch32_img_s"),
                           (f"leave-one-out mAP, {precisions['map_images']} images", "map"),
                           ("cosine to fp32, mean", "mean_cosine"), ("cosine to fp32, min", "min_cosine"),
                           ("kept (|mAP difference| <= 0.005)", "kept")):
            lines.append(f"| {label} | " + " | ".join(_cell(row[key]) for row in rows) + " |")
    if cold:
        lines += ["", f"## Cold index: {cold['dataset']} at {cold['image_size']} px", "",
                  f"{cold['seconds']} s from an empty work directory (goal {cold['goal_s']:.0f} s: "
                  f"{'met' if cold['met'] else 'missed'}): `{cold['command']}` ({cold['output']})."]
    lines += ["", f"Load average {result['load_average']['before']} before, {result['load_average']['after']} after.",
              "", f"    {result['command']}", ""]
    write_text(os.path.join(RESULTS, "throughput.md"), "\n".join(lines))
    return 0


def _cell(value) -> str:
    """A Markdown table cell: yes / no for a flag, else the value as written."""
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def model_flops(model) -> float:
    """Multiply-adds x 2 of a keras model's convolutions and dense layers per image (nested models included)."""
    import keras

    flops = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            flops += model_flops(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, height, width, channels = layer.output.shape
            flops += 2.0 * height * width * channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            flops += 2.0 * height * width * filters * layer.kernel_size[0] * layer.kernel_size[1] * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            flops += 2.0 * layer.input.shape[-1] * layer.units
    return flops


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul GFLOP/s on all cores (numpy's BLAS), best of `repeats`."""
    a, b = (np.random.default_rng(i).standard_normal((size, size)).astype(np.float32) for i in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


def runtime_rows(config, collection, args) -> tuple[list[dict], dict]:
    """Rows per runtime at batch 1 and 32 (pixels in, JPEG bytes in), each runtime measured in a fresh process (a
    runtime's thread pools never run beside the other's), `args.rounds` times in turns, the row of the fastest JPEG
    pipeline kept; and the machine's limit for `config`."""
    import concurrent.futures
    import multiprocessing

    from tf_retrieval.features.embedding import Embedder

    count = min(args.runtime_images, len(collection))
    encoded = [collection.read_bytes(i) for i in range(count)]
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for runtime in ["tf"] + [name for name in args.runtimes if name != "tf"]:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                for row in pool.submit(measure_runtime, config, runtime, encoded, args.repeats, args.workdir).result():
                    key = (row["runtime"], row["batch"])
                    if key not in best or row["pipeline_img_s"] > best[key]["pipeline_img_s"]:
                        best[key] = row
    rows = list(best.values())
    gflop = model_flops(Embedder(config, runtime="tf").model) / 1e9
    matmul = args.matmul_gflop_s
    limit = {"image_size": config.image_size, "matmul_gflop_s": round(matmul, 1),
             "model_gflop_per_image": round(gflop, 4), "limit_img_s": round(matmul / gflop, 1)}
    print(limit, flush=True)
    return rows, limit


def measure_runtime(config, runtime: str, encoded: list[bytes], repeats: int, workdir: str) -> list[dict]:
    """`runtime`'s rows at batch 1 and 32: pixels in, and JPEG bytes in (a quarter of the images at batch 1)."""
    from tf_retrieval.data.images import decode_image, resize_and_crop_array
    from tf_retrieval.features.embedding import Embedder

    count = len(encoded)
    pixels = np.stack([resize_and_crop_array(decode_image(data), config.image_size) for data in encoded])
    rows = []
    embedder = Embedder(config, runtime=runtime, workdir=workdir)
    assert embedder.runtime == runtime, f"{runtime} did not load"
    for batch in (1, 32):
        n = count // 4 if batch == 1 else count
        embedder.batch_size = batch
        embedder.embed_bytes(encoded[:batch])  # warm-up (and the interpreter's resize to this batch)
        timings = {}
        for name, work in (("model", lambda: [embedder.embed_pixels(pixels[i:i + batch]) for i in range(0, n, batch)]),
                           ("pipeline", lambda: [embedder.embed_bytes(encoded[i:i + batch]) for i in range(0, n, batch)])):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                work()
                best = min(best, time.perf_counter() - start)
            timings[name] = best
        rows.append({"image_size": config.image_size, "runtime": embedder.runtime, "batch": batch, "images": n,
                     "model_img_s": round(n / timings["model"], 1),
                     "pipeline_img_s": round(n / timings["pipeline"], 1),
                     "pipeline_ms_per_batch": round(1000 * timings["pipeline"] / (n / batch), 2)})
        print(rows[-1], flush=True)
    return rows


def precision_report(config, collection, calibration: int = 200) -> dict:
    """LiteRT in float16 arithmetic and full-integer (int8) quantisation of `config`'s model against fp32, in this
    process: speed (pixels in, batch 1 and 32) and quality (cosine to the fp32 embeddings, and leave-one-out mAP on the
    collection's images after the first `calibration`, which calibrate the int8 quantisation). Issue 15 keeps a
    reduced precision only within 0.005 mAP of fp32."""
    import tensorflow as tf

    from tf_retrieval.data.images import decode_image, resize_and_crop_array
    from tf_retrieval.evaluation.evaluate import rank_and_score
    from tf_retrieval.features.embedding import build_model
    from tf_retrieval.features.litert import LiteRTModel, convert

    pixels = np.stack([resize_and_crop_array(decode_image(collection.read_bytes(i)), config.image_size)
                       for i in range(len(collection))]).astype(np.float32)
    model = build_model(config)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([pixels[i:i + 1]] for i in range(calibration))
    flatbuffer = convert(model)
    models = {"fp32": LiteRTModel(flatbuffer), "fp16": LiteRTModel(flatbuffer, precision="fp16"),
              "int8": LiteRTModel(converter.convert())}
    held_out, labels = pixels[calibration:], collection.labels[calibration:]
    rows, vectors = [], {}
    for name, forward in models.items():
        row = {"precision": name}
        for batch in (1, 32):
            n = min(len(held_out), 128 if batch == 1 else 1024)
            forward(held_out[:batch])
            start = time.perf_counter()
            for i in range(0, n - batch + 1, batch):
                forward(held_out[i:i + batch])
            row[f"batch{batch}_img_s"] = round((n - n % batch) / (time.perf_counter() - start), 1)
        out = np.concatenate([forward(held_out[i:i + 64]) for i in range(0, len(held_out), 64)])
        vectors[name] = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        cosine = np.sum(vectors["fp32"] * vectors[name], axis=1)
        row.update(map=round(float(rank_and_score(vectors[name], labels)[0]["mAP"]), 4),
                   mean_cosine=round(float(cosine.mean()), 4), min_cosine=round(float(cosine.min()), 4))
        rows.append(row)
    for row in rows:
        row["kept"] = abs(row["map"] - rows[0]["map"]) <= 0.005
    report = {"image_size": config.image_size, "calibration_images": calibration, "map_images": len(held_out),
              "rows": rows}
    print(report, flush=True)
    return report


def cold_index_seconds(dataset: str, image_size: int) -> dict:
    """Wall seconds of `tfr index` over a whole tfds dataset in an empty work directory (no feature cache, no
    converted model, no index): decoding, embedding on the default runtime, training the index and saving it."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "tf_retrieval", "--workdir", workdir, "index", "--dataset", dataset,
                   "--image-size", str(image_size), "--name", "cold"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"tfr index failed: {done.stderr[-2000:]}")
        summary = done.stdout.strip().splitlines()[-1]
    report = {"dataset": dataset, "image_size": image_size, "seconds": round(seconds, 1), "goal_s": 90.0,
              "met": seconds <= 90.0, "output": summary,
              "command": f"tfr --workdir EMPTY_DIR index --dataset {dataset} --image-size {image_size} --name cold"}
    print(report, flush=True)
    return report


def runtime_goals(rows: list[dict], limits: list[dict]) -> list[dict]:
    """Each LiteRT runtime over TensorFlow (JPEG bytes in) per size and batch, and its share of the limit at batch 32."""
    goals = []
    for limit in limits:
        for batch, wanted in ((1, 5.0), (32, 2.5)):
            pick = {r["runtime"]: r for r in rows if r["image_size"] == limit["image_size"] and r["batch"] == batch}
            for runtime in sorted(name for name in pick if name != "tf"):
                ratio = pick[runtime]["pipeline_img_s"] / pick["tf"]["pipeline_img_s"]
                goal = {"runtime": runtime, "image_size": limit["image_size"], "batch": batch,
                        "over_tf": round(ratio, 2), "goal_over_tf": wanted, "met_over_tf": ratio >= wanted}
                if batch == 32:
                    share = pick[runtime]["pipeline_img_s"] / limit["limit_img_s"]
                    goal.update(share_of_limit=round(share, 3), met_limit=share >= 0.5)
                goals.append(goal)
    return goals


if __name__ == "__main__":
    sys.exit(main())
