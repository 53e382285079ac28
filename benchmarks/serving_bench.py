"""Served (gRPC, TF Serving protocol) against in-process embedding throughput and latency.

Exports the embedder as a SavedModel, starts `python -m tf_retrieval.serving` (gRPC only) on it in a separate process
(as deployed), then sends the same JPEG batches (a) straight to the loaded SavedModel's `serving_default` signature in
this process and (b) through `tf_retrieval.serving.client.EmbeddingClient` over loopback gRPC, from `concurrency`
threads. Writes benchmarks/results/serving.json (the headline: batch 32, the highest concurrency, plus every
configuration under "runs") and serving.md.

    python benchmarks/serving_bench.py                      # EfficientNet-Lite0 ImageNet at 96 px, CIFAR-10 test JPEGs
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

from tf_retrieval.storage import write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def query_images(count: int) -> tuple[list[bytes], str]:
    """CIFAR-10 test JPEGs through tfds when available, else generated JPEGs of the same size."""
    try:
        from tf_retrieval.data.images import load_tfds

        collection = load_tfds("cifar10", splits=["test"])
        return [collection.read_bytes(i) for i in range(count)], "cifar10 test (32 px JPEG)"
    except Exception as exc:  # no prepared data: say so in the record
        import io

        from PIL import Image

        print(f"cifar10 unavailable ({exc}); using generated 32 px JPEGs", file=sys.stderr)
        rng = np.random.default_rng(0)
        images = []
        for _ in range(count):
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, format="JPEG")
            images.append(out.getvalue())
        return images, "generated 32 px JPEGs"


def measure(call, batches: list[list[bytes]], concurrency: int) -> tuple[float, list[float]]:
    """Runs `call(batch)` for every batch from `concurrency` threads; returns (images per second, latencies in ms)."""
    latencies = []

    def timed(batch):
        start = time.perf_counter()
        call(batch)
        return (time.perf_counter() - start) * 1000

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        latencies = list(pool.map(timed, batches))
        elapsed = time.perf_counter() - start
    return sum(len(b) for b in batches) / elapsed, latencies


def start_server(base_dir: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, "-m", "tf_retrieval.serving", "--model_base_path", base_dir,
                                "--port", "0", "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0",
                                "--max_workers", "16"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                               cwd=os.path.dirname(HERE))
    line = process.stdout.readline()
    if not line.startswith("serving on"):
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, int(line.strip().rsplit(":", 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=1024, help="images sent per configuration")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tf_retrieval.serving.client import EmbeddingClient
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.features.embedding import build_model
    from tf_retrieval.evaluation.evaluate import machine_description
    from tf_retrieval.serving.export import export_model

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    config = ModelConfig(backbone=args.backbone, image_size=args.image_size,
                         weights=None if args.weights == "none" else args.weights)
    images, dataset = query_images(args.images)
    base_dir = tempfile.mkdtemp(prefix="serving-bench-")
    path = export_model(build_model(config), base_dir, "baseline", image_size=config.image_size, config=config.to_dict())
    signature = tf.saved_model.load(path).signatures["serving_default"]

    def in_process(batch):
        return signature(images=tf.constant(batch))["embedding"].numpy()

    server, port = start_server(base_dir)
    runs = []
    try:
        client = EmbeddingClient(f"127.0.0.1:{port}", "baseline")
        for batch_size in args.batches:
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            if batch_size == 1:
                batches = batches[:256]  # latency runs: 256 single-image requests
            np.testing.assert_allclose(client.embed_bytes(batches[0]), in_process(batches[0]), atol=1e-5)
            for concurrency in args.concurrency:
                measure(in_process, batches[:4], concurrency)  # warm-up: traces and thread pools
                measure(client.embed_bytes, batches[:4], concurrency)
                local_rate, local_ms = measure(in_process, batches, concurrency)
                grpc_rate, grpc_ms = measure(client.embed_bytes, batches, concurrency)
                run = {"batch": batch_size, "concurrency": concurrency, "in_process_img_s": round(local_rate, 1),
                       "grpc_img_s": round(grpc_rate, 1), "served_over_in_process": round(grpc_rate / local_rate, 3),
                       "in_process_p50_ms": round(float(np.percentile(local_ms, 50)), 2),
                       "grpc_p50_ms": round(float(np.percentile(grpc_ms, 50)), 2),
                       "grpc_p99_ms": round(float(np.percentile(grpc_ms, 99)), 2),
                       "requests": len(batches)}
                runs.append(run)
                print(json.dumps(run), flush=True)
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    headline = max((r for r in runs if r["batch"] == max(args.batches)), key=lambda r: r["concurrency"])
    result = {**headline, "image_size": config.image_size, "backbone": config.backbone, "weights": str(config.weights),
              "dataset": dataset, "command": command, "machine": machine_description(),
              "date": datetime.date.today().isoformat(), "runs": runs}
    write_json(os.path.join(args.out, "serving.json"), result, indent=1)
    lines = ["# Serving throughput and latency", "",
             f"{config.backbone} ({config.weights}) at {config.image_size} px, {dataset}; {result['machine']}; "
             f"{result['date']}. In process = the exported SavedModel's `serving_default` signature called in this "
             "process; gRPC = the same SavedModel behind `python -m tf_retrieval.serving` (a separate process) "
             "through `tf_retrieval.serving.client.EmbeddingClient` on loopback. Both decode the same JPEG bytes.", "",
             "| batch | concurrency | in-process img/s | gRPC img/s | served / in-process | in-process p50 ms | "
             "gRPC p50 ms | gRPC p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['batch']} | {r['concurrency']} | {r['in_process_img_s']} | {r['grpc_img_s']} | "
                     f"{r['served_over_in_process']:.2f} | {r['in_process_p50_ms']} | {r['grpc_p50_ms']} | "
                     f"{r['grpc_p99_ms']} |")
    lines += ["", "    " + command, ""]
    write_text(os.path.join(args.out, "serving.md"), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
