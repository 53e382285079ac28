"""Load test of the search page's API: N upload-searches at concurrency C against the production (waitress) server.

The server runs in a child process (the real `web.app.create_app` + `create_server`, bound to 127.0.0.1 only) over one
engine taken from, in order of preference:

  --bundle DIR          an index bundle (`RetrievalEngine.load`; tfds data from $TFDS_DATA_DIR);
  --dataset cifar10     CIFAR-10 from $TFDS_DATA_DIR: the 50,000 train images indexed, test images as queries
                        (embeddings cached under $TFR_WORKDIR/cache/features);
  --dataset synthetic   generated shape images (default), so the script runs anywhere.

This process is only the client: C threads with keep-alive connections POST multipart uploads (query images sent by the
server process, never seen by the index when the source has a test split) to /api/search until N requests are done
(a bounded loop; a few warm-up requests first are not counted). It records client latency percentiles, throughput,
errors, the server's own embed/search times, and the server's RSS before, during and after the run.

    python benchmarks/web_load.py --dataset cifar10 --backbone efficientnet_lite0 --image-size 96 --requests 2000
    python benchmarks/web_load.py --bundle artifacts/bundles/cifar10-baseline
    python benchmarks/web_load.py --dataset synthetic --synthetic-size 2000      # no data needed

Writes benchmarks/results/web_load.json and web_load.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import shlex
import sys
import threading
import time
import uuid

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: import tf_retrieval from this checkout
    sys.path.insert(0, REPO)
from tf_retrieval.storage import write_text  # noqa: E402 -- after the path

logger = logging.getLogger("web_load")

GOAL = {"requests": 2000, "errors": 0, "p50_ms": 60.0, "p99_ms": 150.0}
#: RSS growth (MB) between the first sample after warm-up and the end that still counts as "no memory growth".
RSS_TOLERANCE_MB = 50.0


# ------------------------------------------------------------------------------------------------ server side (child)

def synthetic_collection(count: int, size: int = 64, seed: int = 0):
    """`count` generated PNG images of 8 shape classes, encoded in memory, with a 90/10 index/query split."""
    from PIL import Image, ImageDraw

    from tf_retrieval.data.images import ImageCollection

    shapes = ["circle", "square", "triangle", "stripes", "ring", "cross", "diamond", "dots"]
    rng = np.random.default_rng(seed)
    encoded, labels = [], []
    for i in range(count):
        label = i % len(shapes)
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 255, 3)))
        draw = ImageDraw.Draw(image)
        fill = tuple(int(v) for v in rng.integers(0, 200, 3))
        r = int(rng.integers(size // 5, size // 2 - 2))
        cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
        shape = shapes[label]
        if shape in ("circle", "ring"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=None if shape == "ring" else fill, outline=fill,
                         width=max(2, r // 3))
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif shape == "stripes":
            width = int(rng.integers(2, 6))
            for x in range(0, size, 2 * width):
                draw.rectangle([x, 0, x + width - 1, size], fill=fill)
        elif shape == "cross":
            t = max(2, r // 3)
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            for _ in range(int(rng.integers(4, 10))):
                x, y = (int(v) for v in rng.integers(4, size - 4, 2))
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=fill)
        out = io.BytesIO()
        image.save(out, format="PNG")
        encoded.append(out.getvalue())
        labels.append(label)
    splits = np.where(np.arange(count) % 10 == 9, "test", "train")
    return ImageCollection(name=f"synthetic-{count}-{size}px-seed{seed}", ids=[f"synthetic/{i:06d}.png" for i in range(count)],
                           labels=np.array(labels), class_names=shapes, splits=splits, encoded=encoded)


def build_engine(args):
    """The engine to serve and the query images (encoded bytes) to send, per the source chosen on the command line."""
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.features.embedding import Embedder
    from tf_retrieval.search.engine import RetrievalEngine
    from tf_retrieval.features.cache import default_workdir, extract_features
    from tf_retrieval.search.index import build_index

    if args.bundle:
        engine = RetrievalEngine.load(args.bundle, data_dir=os.environ.get("TFDS_DATA_DIR"))
        positions = np.random.default_rng(0).choice(len(engine.collection), min(args.queries, len(engine.collection)),
                                                    replace=False)
        queries = [engine.collection.read_bytes(int(p)) for p in positions]
        return engine, queries, f"bundle {os.path.abspath(args.bundle)} ({engine.collection.name})"

    if args.dataset == "cifar10":
        if not os.environ.get("TFDS_DATA_DIR"):
            raise SystemExit("--dataset cifar10 needs TFDS_DATA_DIR pointing at prepared tensorflow_datasets")
        from tf_retrieval.data.images import load_tfds

        collection = load_tfds("cifar10", data_dir=os.environ["TFDS_DATA_DIR"])
        source = "cifar10 (train split indexed, test split queries)"
    else:
        collection = synthetic_collection(args.synthetic_size)
        source = f"synthetic ({collection.name}; 90% indexed, 10% queries)"
    database = collection.subset(np.flatnonzero(collection.splits == "train")[:args.max_index])
    if args.max_index:
        source += f", first {len(database)} train images only (--max-index)"
    query_pool = np.flatnonzero(collection.splits == "test")
    picks = np.random.default_rng(0).choice(query_pool, min(args.queries, len(query_pool)), replace=False)
    queries = [collection.read_bytes(int(p)) for p in picks]

    config = ModelConfig(name="baseline", backbone=args.backbone, image_size=args.image_size, pooling="avg",
                         weights=None if args.weights == "none" else args.weights)
    embedder = Embedder(config)
    cache_dir = os.path.join(default_workdir(), "cache", "features") if args.dataset == "cifar10" else None
    t0 = time.perf_counter()
    vectors = extract_features(database, embedder.model, image_size=config.image_size, model_key=config.model_id(),
                               cache_dir=cache_dir, progress=False)
    logger.info("embedded %d database images in %.1f s", len(database), time.perf_counter() - t0)
    index = build_index(vectors, np.arange(len(database)), metric="cosine", backend=args.backend)
    return RetrievalEngine(config, database, index, embedder), queries, source


def serve_child(args, channel) -> None:
    """Child process: build the engine, start waitress on a free 127.0.0.1 port, report, serve until told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    try:
        from tf_retrieval.web.app import create_app, create_server

        engine, queries, source = build_engine(args)
        app = create_app({engine.name: engine}, default_k=args.k, warmup=True, batching=not args.no_batching,
                         batch_wait_ms=args.batch_wait_ms, batch_workers=args.batch_workers)
        server = create_server(app, host="127.0.0.1", port=0, threads=args.threads)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        channel.send({"port": int(server.effective_port), "queries": queries, "source": source, "index_size": len(engine),
                      "backbone": engine.config.backbone, "image_size": engine.config.image_size,
                      "weights": engine.config.weights, "index": type(engine.index).__name__, "model": engine.name})
        channel.recv()  # block until the parent is done
        server.close()
    except BaseException as exc:  # report any failure to the parent instead of leaving it waiting
        channel.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ------------------------------------------------------------------------------------------------ client side

def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
             for name, value in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"query.png\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class LoadClient:
    """C worker threads sharing a request counter; each keeps one HTTP/1.1 connection open."""

    def __init__(self, port: int, queries: list[bytes], k: int):
        self.port = port
        self.bodies = [multipart(q, {"k": str(k)}) for q in queries]
        self.lock = threading.Lock()

    def run(self, requests: int, concurrency: int, on_progress=None) -> dict:
        latencies: list[float] = []
        server_embed: list[float] = []
        server_search: list[float] = []
        errors: list[str] = []
        issued = iter(range(requests))

        def worker():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            while True:
                with self.lock:
                    i = next(issued, None)
                if i is None:
                    break
                body, content_type = self.bodies[i % len(self.bodies)]
                t0 = time.perf_counter()
                try:
                    connection.request("POST", "/api/search", body=body, headers={"Content-Type": content_type})
                    response = connection.getresponse()
                    payload = response.read()
                    elapsed = (time.perf_counter() - t0) * 1000
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
                    answer = json.loads(payload)
                    if not answer["results"]:
                        raise RuntimeError("no results")
                except Exception as exc:  # count it, reconnect, go on: the run is bounded by the counter
                    with self.lock:
                        errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                    continue
                with self.lock:
                    latencies.append(elapsed)
                    server_embed.append(answer["timing_ms"].get("embed_ms", 0.0))
                    server_search.append(answer["timing_ms"].get("search_ms", 0.0))
                    done = len(latencies) + len(errors)
                if on_progress:
                    on_progress(done)
            connection.close()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        return {"latencies": np.array(latencies), "embed": np.array(server_embed), "search": np.array(server_search),
                "errors": errors, "wall_s": wall}


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/api/health")
    body = json.loads(connection.getresponse().read())
    connection.close()
    return body


def mean_batch(before: dict, after: dict, model: str) -> float | None:
    """Average number of uploads per model call during the run (the server's dynamic batching)."""
    a, b = after.get("embedding_batches", {}).get(model), before.get("embedding_batches", {}).get(model)
    if not a or not b or a["batches"] == b["batches"]:
        return None
    return round((a["images"] - b["images"]) / (a["batches"] - b["batches"]), 2)


def machine() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def percentile(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")


def write_markdown(path: str, result: dict) -> None:
    goal = result["goal"]
    rows = [
        ("requests (errors)", f"{result['requests']} ({result['errors']})", f"{goal['requests']} (0)"),
        ("concurrency / server threads", f"{result['concurrency']} / {result['server_threads']}", "8"),
        ("p50 latency", f"{result['p50_ms']:.1f} ms", f"≤ {goal['p50_ms']:.0f} ms"),
        ("p90 latency", f"{result['p90_ms']:.1f} ms", ""),
        ("p99 latency", f"{result['p99_ms']:.1f} ms", f"≤ {goal['p99_ms']:.0f} ms"),
        ("max latency", f"{result['max_ms']:.1f} ms", ""),
        ("throughput", f"{result['rps']:.1f} req/s", ""),
        ("server embed p50 / search p50", f"{result['server_embed_p50_ms']:.1f} / {result['server_search_p50_ms']:.2f} ms", ""),
        ("mean uploads per model call (dynamic batching)", f"{result['mean_embedding_batch']}", ""),
        ("server / load-client CPU time per request",
         f"{result['server_cpu_ms_per_request']:.1f} / {result['client_cpu_ms_per_request']:.1f} ms", ""),
        ("machine CPU busy during the run (all cores)", f"{result['machine_cpu_busy_percent']:.0f}%", ""),
        ("server RSS start → end (peak)",
         f"{result['rss_mb_start']:.0f} → {result['rss_mb_end']:.0f} MB ({result['rss_mb_peak']:.0f})",
         f"growth ≤ {RSS_TOLERANCE_MB:.0f} MB"),
    ]
    lines = [
        "# Web API load test",
        "",
        f"Upload-searches (`POST /api/search`, multipart image, k={result['k']}) against the production waitress server on "
        f"127.0.0.1, run {result['date']}.",
        "",
        f"- Collection: {result['source']}; index size {result['index_size']:,} ({result['index']})",
        f"- Model: {result['backbone']} at {result['image_size']} px, weights {result['weights']}",
        f"- Machine: {result['machine'].get('cpu_model', result['machine']['processor'])}, "
        f"{result['machine']['usable_cores']} usable cores, {result['machine']['memory_gb']} GB; "
        f"load average at start {result['machine']['load_avg_at_start']}",
        f"- Command: `{result['command']}`",
        "",
        "| metric | measured | goal |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Goal met: **{'yes' if result['goal_met'] else 'no'}** ({result['goal_note']}).",
        "",
        f"RSS samples during the run (MB, every ~{result['rss_sample_every']} requests): "
        f"{', '.join(f'{x:.0f}' for x in result['rss_mb_samples'])}.",
    ]
    if result["error_examples"]:
        lines += ["", "First errors:", "", *[f"- `{e}`" for e in result["error_examples"]]]
    write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="serve this index bundle")
    parser.add_argument("--dataset", choices=["synthetic", "cifar10"], default="synthetic")
    parser.add_argument("--synthetic-size", type=int, default=2000, help="images in the synthetic collection")
    parser.add_argument("--max-index", type=int, default=None, help="index only the first N database images (quick checks)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--weights", default="imagenet", help="backbone weights: imagenet, none, or a file")
    parser.add_argument("--backend", default="auto", help="index backend (auto, exact, scann)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads")
    parser.add_argument("--warmup", type=int, default=40, help="requests sent first and not counted")
    parser.add_argument("--queries", type=int, default=500, help="distinct query images cycled through")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the app's dynamic batching wait")
    parser.add_argument("--batch-workers", type=int, default=2, help="the app's concurrent model calls")
    parser.add_argument("--no-batching", action="store_true", help="embed every upload on its own")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "web_load.json"))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import psutil

    context = mp.get_context("spawn")  # a fresh interpreter: TensorFlow lives only in the server
    parent_end, child_end = context.Pipe()
    child = context.Process(target=serve_child, args=(args, child_end), daemon=True)
    child.start()
    try:
        if not parent_end.poll(3600):
            raise SystemExit("the server did not start within an hour")
        info = parent_end.recv()
        if "error" in info:
            raise SystemExit(f"the server failed to start: {info['error']}")
        server = psutil.Process(child.pid)
        logger.info("server pid %d on port %d: %s, %d indexed, %d query images", child.pid, info["port"], info["source"],
                    info["index_size"], len(info["queries"]))
        client = LoadClient(info["port"], info["queries"], args.k)
        warm = client.run(args.warmup, args.concurrency)
        if warm["errors"]:
            raise SystemExit(f"warm-up requests failed: {warm['errors'][:3]}")

        def rss_mb() -> float:
            return server.memory_info().rss / 2**20

        every = max(1, args.requests // 10)
        samples = [rss_mb()]
        marks = set(range(every, args.requests + 1, every))

        def progress(done: int):
            if done in marks:
                samples.append(rss_mb())
                logger.info("%d/%d requests", done, args.requests)

        health_before = health(info["port"])
        cpu_before = sum(server.cpu_times()[:2])
        client_before = time.process_time()
        psutil.cpu_percent()  # starts the machine-wide measurement
        run = client.run(args.requests, args.concurrency, on_progress=progress)
        machine_busy = psutil.cpu_percent()
        client_cpu = time.process_time() - client_before
        cpu_after = sum(server.cpu_times()[:2])
        samples.append(rss_mb())
        health_after = health(info["port"])
    finally:
        if child.is_alive():
            parent_end.send("stop")
            child.join(timeout=30)
        if child.is_alive():
            child.terminate()

    latencies = run["latencies"]
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "server_threads": args.threads,
        "errors": len(run["errors"]),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": round(float(latencies.max()), 2) if len(latencies) else float("nan"),
        "mean_ms": round(float(latencies.mean()), 2) if len(latencies) else float("nan"),
        "rps": round(len(latencies) / run["wall_s"], 2),
        "wall_s": round(run["wall_s"], 2),
        "server_embed_p50_ms": percentile(run["embed"], 50),
        "server_search_p50_ms": percentile(run["search"], 50),
        "mean_embedding_batch": mean_batch(health_before, health_after, info["model"]),
        "server_cpu_ms_per_request": round((cpu_after - cpu_before) * 1000 / max(1, len(latencies)), 2),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / max(1, len(latencies)), 2),
        "machine_cpu_busy_percent": machine_busy,
        "batching": {"enabled": not args.no_batching, "wait_ms": args.batch_wait_ms, "workers": args.batch_workers},
        "index_size": info["index_size"],
        "index": info["index"],
        "backbone": info["backbone"],
        "image_size": info["image_size"],
        "weights": info["weights"],
        "source": info["source"],
        "dataset": "bundle" if args.bundle else args.dataset,
        "k": args.k,
        "warmup_requests": args.warmup,
        "distinct_queries": len(info["queries"]),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rss_mb_start": round(samples[0], 1),
        "rss_mb_end": round(samples[-1], 1),
        "rss_mb_peak": round(max(samples), 1),
        "rss_mb_samples": [round(x, 1) for x in samples],
        "rss_sample_every": every,
        "error_examples": run["errors"][:5],
        "goal": {**GOAL, "rss_growth_mb": RSS_TOLERANCE_MB,
                 "setting": "CIFAR-10 index, efficientnet_lite0 at 96 px, 2,000 requests at concurrency 8"},
    }
    checks = {"errors": result["errors"] == 0, "p50": result["p50_ms"] <= GOAL["p50_ms"],
              "p99": result["p99_ms"] <= GOAL["p99_ms"],
              "memory": result["rss_mb_end"] - result["rss_mb_start"] <= RSS_TOLERANCE_MB}
    met = all(checks.values())
    in_setting = (result["dataset"] in ("cifar10", "bundle") and result["backbone"] == "efficientnet_lite0"
                  and result["image_size"] == 96 and result["requests"] >= GOAL["requests"] and result["concurrency"] == 8)
    result["goal_met"] = bool(met and in_setting)
    missed = [name for name, ok in checks.items() if not ok]
    result["goal_note"] = (("all targets met" if met else f"missed: {', '.join(missed)}; met: "
                            + ", ".join(name for name, ok in checks.items() if ok))
                           + ("" if in_setting else "; not the goal's setting (CIFAR-10, efficientnet_lite0 @ 96 px, "
                                                    "2,000 requests at concurrency 8), so this run does not count"))
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    write_markdown(os.path.splitext(args.out)[0] + ".md", result)
    logger.info("p50 %.1f ms, p99 %.1f ms, %.1f req/s, %d errors, RSS %.0f -> %.0f MB; wrote %s", result["p50_ms"],
                result["p99_ms"], result["rps"], result["errors"], result["rss_mb_start"], result["rss_mb_end"], args.out)
    return result


if __name__ == "__main__":
    main()
