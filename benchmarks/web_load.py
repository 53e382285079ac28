"""Load test of the search page: N upload-searches at concurrency C against `tfr web`, the production server.

Each run starts `tfr web --index BUNDLE --runtime R --workers W` in its own process group (waitress, bound to
127.0.0.1), waits for it, sends a few warm-up requests, then C client threads with keep-alive connections POST
multipart uploads to /api/search until N requests are done. It records client latency percentiles, throughput,
errors, the server's own embed/search times, the CPU time of the server's processes and of this client per request,
and the servers' memory (RSS summed over the worker processes) before, during and after the run.

A run is `BUNDLE` or `BUNDLE@RUNTIME` (litert by default); the first run is the headline, and a run of the same
bundle on `tf` gives the LiteRT / TensorFlow ratio. Query images come from `--query-dataset` (e.g. the CIFAR-10 test
split, never indexed), else from the bundle's own collection.

    tfr index --dataset cifar10 --split train --image-size 96 --name cifar10-train-96     # then:
    python benchmarks/web_load.py --run artifacts/indexes/cifar10-train-96 \\
        --run artifacts/indexes/cifar10-train-96@tf --run artifacts/indexes/cifar10-train-160 \\
        --run artifacts/indexes/cifar10-train-96-ft128 --query-dataset cifar10 --query-split test --repeats 3
    python benchmarks/web_load.py --synthetic 2000        # no data needed: a generated collection, random weights

Writes benchmarks/results/web_load.json and web_load.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: import tf_retrieval from this checkout
    sys.path.insert(0, REPO)
from tf_retrieval.storage import write_json, write_text  # noqa: E402 -- after the path

logger = logging.getLogger("web_load")

#: Issue 15's goals, for CIFAR-10 (50k indexed), EfficientNet-Lite0 at 96 px, 2,000 requests at concurrency 8.
GOAL = {"requests": 2000, "concurrency": 8, "errors": 0, "rps": 300.0, "p50_ms": 30.0, "p99_ms": 60.0,
        "rss_growth_mb": 50.0, "litert_over_tf": 3.0}


# ------------------------------------------------------------------------------------------------ queries and data

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


def synthetic_bundle(count: int, directory: str) -> tuple[str, list[bytes]]:
    """An index bundle of the train part of `synthetic_collection(count)` (random-weight Lite0, 64 px), and the
    encoded test images as queries."""
    from tf_retrieval.config import ModelConfig
    from tf_retrieval.search.engine import index_collection

    collection = synthetic_collection(count)
    bundle = os.path.join(directory, "synthetic")
    config = ModelConfig(name="baseline", backbone="efficientnet_lite0", image_size=64, weights=None)
    index_collection(collection.subset(np.flatnonzero(collection.splits == "train")), config, bundle,
                     source="synthetic", workdir=directory, progress=False)
    test = np.flatnonzero(collection.splits == "test")
    return bundle, [collection.read_bytes(int(i)) for i in test]


def query_images(args, bundle: str) -> list[bytes]:
    """`--queries` encoded images: of `--query-dataset` (split `--query-split`), else of the bundle's collection."""
    from tf_retrieval.data.images import load_collection
    from tf_retrieval.search.engine import RetrievalEngine

    if args.query_dataset:
        collection = load_collection(args.query_dataset, splits=[args.query_split] if args.query_split else None)
    else:
        collection = RetrievalEngine.load(bundle).collection
    picks = np.random.default_rng(0).choice(len(collection), min(args.queries, len(collection)), replace=False)
    return [collection.read_bytes(int(p)) for p in picks]


# ------------------------------------------------------------------------------------------------ the server

class WebServer:
    """`tfr web` over one bundle in a child process group, on a free localhost port; `.processes()` are its workers."""

    def __init__(self, bundle: str, runtime: str, workers: int, threads: int, log_path: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "tf_retrieval", "web", "--index", os.path.abspath(bundle), "--runtime",
                   runtime, "--workers", str(workers), "--threads", str(threads), "--port", str(self.port)]
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.workers = workers

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"tfr web exited with {self.process.returncode}; see {self.log.name}")
            try:
                body = health(self.port)
                if len(self.processes()) >= self.workers:
                    return body
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"tfr web did not answer within {timeout:.0f} s; see {self.log.name}")

    def processes(self):
        import psutil

        parent = psutil.Process(self.process.pid)
        children = parent.children()
        return children if self.workers > 1 else [parent]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/api/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------------ the client

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


# ------------------------------------------------------------------------------------------------ one run

def percentile(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")


def load_run(spec: str, args, queries: list[bytes] | None, log_path: str) -> dict:
    """Starts `tfr web` for `spec` (BUNDLE or BUNDLE@RUNTIME), loads it, stops it; returns the run's figures."""
    import psutil

    from tf_retrieval.config import ModelConfig

    bundle, _, runtime = spec.partition("@")
    runtime = runtime or "litert"
    config = ModelConfig.load(os.path.join(bundle, "model.json"))
    with open(os.path.join(bundle, "index", "manifest.json")) as f:
        manifest = json.load(f)
    state = os.path.join(bundle, "index", "scann", "state.json")  # a ScaNN searcher's trained settings
    if os.path.isfile(state):
        with open(state) as f:
            manifest["config"]["params"] = json.load(f)["params"]
    queries = queries or query_images(args, bundle)
    logger.info("run %s: %s at %d px, %s index of %d, runtime %s, %d workers", spec, config.name, config.image_size,
                manifest["backend"], manifest["count"], runtime, args.workers)
    server = WebServer(bundle, runtime, args.workers, args.threads, log_path)
    try:
        server.wait_ready()
        client = LoadClient(server.port, queries, args.k)
        warm = client.run(args.warmup, args.concurrency)
        if warm["errors"]:
            raise SystemExit(f"warm-up requests failed: {warm['errors'][:3]}")
        processes = server.processes()

        def rss_mb() -> float:
            return sum(p.memory_info().rss for p in processes) / 2**20

        every = max(1, args.requests // 10)
        samples, marks = [rss_mb()], set(range(every, args.requests + 1, every))

        def progress(done: int):
            if done in marks:
                samples.append(rss_mb())

        cpu_before = sum(sum(p.cpu_times()[:2]) for p in processes)
        client_before = time.process_time()
        psutil.cpu_percent()
        load_before = os.getloadavg()
        run = client.run(args.requests, args.concurrency, on_progress=progress)
        machine_busy = psutil.cpu_percent()
        client_cpu = time.process_time() - client_before
        cpu_after = sum(sum(p.cpu_times()[:2]) for p in processes)
        samples.append(rss_mb())
    finally:
        server.stop()
    latencies, served = run["latencies"], max(1, len(run["latencies"]))
    row = {"run": spec, "bundle": os.path.relpath(bundle, REPO), "runtime": runtime, "model": config.name,
           "backbone": config.backbone, "image_size": config.image_size, "weights": str(config.weights),
           "embedding_dim": int(manifest["dim"]), "index": manifest["backend"], "index_size": int(manifest["count"]),
           "index_params": manifest["config"].get("params"),
           "requests": args.requests, "concurrency": args.concurrency, "workers": args.workers,
           "threads_per_worker": args.threads, "errors": len(run["errors"]),
           "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90), "p99_ms": percentile(latencies, 99),
           "max_ms": round(float(latencies.max()), 2) if len(latencies) else float("nan"),
           "rps": round(len(latencies) / run["wall_s"], 2), "wall_s": round(run["wall_s"], 2),
           "server_embed_p50_ms": percentile(run["embed"], 50), "server_search_p50_ms": percentile(run["search"], 50),
           "server_cpu_ms_per_request": round((cpu_after - cpu_before) * 1000 / served, 2),
           "client_cpu_ms_per_request": round(client_cpu * 1000 / served, 2),
           "machine_cpu_busy_percent": machine_busy, "load_average_before": [round(x, 2) for x in load_before],
           "rss_mb_start": round(samples[0], 1), "rss_mb_end": round(samples[-1], 1),
           "rss_mb_peak": round(max(samples), 1), "rss_mb_samples": [round(x, 1) for x in samples],
           "error_examples": run["errors"][:5]}
    logger.info("%s: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d errors, server CPU %.1f ms/request", spec, row["rps"],
                row["p50_ms"], row["p99_ms"], row["errors"], row["server_cpu_ms_per_request"])
    return row


# ------------------------------------------------------------------------------------------------ report

def machine() -> dict:
    import psutil

    from benchmarks.throughput import matmul_gflops

    info = {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            # the speed of this (shared, virtual) machine at the time: the same kind of machine has measured 140-193
            "matmul_gflop_s": round(matmul_gflops(repeats=5), 1)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def goals(rows: list[dict]) -> dict:
    """The headline run (the first) against `GOAL`, and LiteRT over TensorFlow on the same bundle when both ran."""
    head = rows[0]
    checks = {"errors": head["errors"] == GOAL["errors"], "rps": head["rps"] >= GOAL["rps"],
              "p50": head["p50_ms"] <= GOAL["p50_ms"], "p99": head["p99_ms"] <= GOAL["p99_ms"],
              "memory": head["rss_mb_end"] - head["rss_mb_start"] <= GOAL["rss_growth_mb"]}
    tf_rows = [r for r in rows if r["bundle"] == head["bundle"] and r["runtime"] == "tf"]
    ratio = round(head["rps"] / tf_rows[0]["rps"], 2) if tf_rows and head["runtime"] != "tf" else None
    if ratio is not None:
        checks["litert_over_tf"] = ratio >= GOAL["litert_over_tf"]
    in_setting = (head["bundle"].find("cifar10") >= 0 and head["backbone"] == "efficientnet_lite0"
                  and head["image_size"] == 96 and head["requests"] >= GOAL["requests"]
                  and head["concurrency"] == GOAL["concurrency"])
    return {"targets": GOAL, "checks": checks, "litert_over_tf": ratio, "in_setting": in_setting,
            "met": bool(in_setting and all(checks.values()))}


def _spread(row: dict) -> str:
    runs = row.get("rps_runs", ())
    return f" ({', '.join(f'{rps:.0f}' for rps in runs)})" if len(runs) > 1 else ""


def median_run(runs: list[dict]) -> dict:
    """The run of median req/s among repeated runs of one row (the lower middle of an even count), with every run's
    req/s as `rps_runs`: a shared host's speed drifts between runs, and one run can land on a slow or a fast minute."""
    chosen = sorted(runs, key=lambda run: run["rps"])[(len(runs) - 1) // 2]
    return {**chosen, "rps_runs": [run["rps"] for run in runs]}


def write_markdown(path: str, result: dict) -> None:
    goal = result["goals"]
    lines = ["# Web API load test", "",
             f"Upload-searches (`POST /api/search`, multipart image, k={result['k']}) against `tfr web` (waitress, "
             f"{result['workers']} worker processes x {result['threads_per_worker']} threads) on 127.0.0.1, "
             f"{result['requests']} requests at concurrency {result['concurrency']} per run, run {result['date']}.",
             "", f"- Queries: {result['queries']}",
             f"- Machine: {result['machine'].get('cpu_model', result['machine']['processor'])}, "
             f"{result['machine']['usable_cores']} usable cores, {result['machine']['memory_gb']} GB; load average at "
             f"start {result['machine']['load_avg_at_start']}; float32 matmul "
             f"{result['machine'].get('matmul_gflop_s')} GFLOP/s on all cores",
             f"- Command: `{result['command']}`", "",
             "| run | model | px | dim | index | runtime | req/s | p50 ms | p99 ms | errors | server embed / search p50 ms "
             "| server / client CPU ms per request | RSS start → end MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['bundle']} | {r['model']} | {r['image_size']} | {r['embedding_dim']} | {r['index']} "
                     f"{r['index_size']:,} | {r['runtime']} | {r['rps']:.1f}{_spread(r)} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['errors']} | {r['server_embed_p50_ms']:.1f} / {r['server_search_p50_ms']:.2f} | "
                     f"{r['server_cpu_ms_per_request']:.1f} / {r['client_cpu_ms_per_request']:.1f} | "
                     f"{r['rss_mb_start']:.0f} → {r['rss_mb_end']:.0f} |")
    if any(len(r.get("rps_runs", ())) > 1 for r in result["runs"]):
        lines += ["", "Each row was run several times, each with a fresh server; the row shows the run of median "
                      "req/s, and in brackets every run's req/s."]
    checks = goal["checks"]
    target = goal["targets"]
    lines += ["", f"Goals (issue 15, headline run = the first row): >= {target['rps']:.0f} req/s "
              f"({'met' if checks['rps'] else 'missed'}), p50 <= {target['p50_ms']:.0f} ms "
              f"({'met' if checks['p50'] else 'missed'}), p99 <= {target['p99_ms']:.0f} ms "
              f"({'met' if checks['p99'] else 'missed'}), 0 errors ({'met' if checks['errors'] else 'missed'}), "
              f"RSS growth <= {target['rss_growth_mb']:.0f} MB ({'met' if checks['memory'] else 'missed'})"
              + (f", LiteRT >= {target['litert_over_tf']:.0f}x TensorFlow: {goal['litert_over_tf']}x "
                 f"({'met' if checks['litert_over_tf'] else 'missed'})" if goal["litert_over_tf"] is not None else "")
              + ("" if goal["in_setting"] else "; this run is not the goal's setting (CIFAR-10 50k, Lite0 at 96 px, "
                                               "2,000 requests at concurrency 8) and does not count") + ".",
              "", "Server CPU is the user + system time of the server's processes during the run; RSS is summed over "
              "its worker processes. Server embed / search are the page's own timings (`timing_ms`), wall time "
              "inside a request, so they include waiting for a core."]
    write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="BUNDLE[@RUNTIME]",
                        help="serve this index bundle (runtime litert by default, or @tf); repeat for more rows")
    parser.add_argument("--synthetic", type=int, metavar="N", help="no data: index N generated images (90%%) and "
                                                                   "query with the rest, on litert and tf")
    parser.add_argument("--query-dataset", help="query images from this tfds name or folder (default: the bundle's)")
    parser.add_argument("--query-split", help="its split, e.g. test")
    parser.add_argument("--queries", type=int, default=500, help="distinct query images cycled through")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="`tfr web --workers` (default: 2, the cores here)")
    parser.add_argument("--threads", type=int, default=4, help="`tfr web --threads` per worker")
    parser.add_argument("--warmup", type=int, default=40, help="requests sent first and not counted")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row, each with a fresh server: the row is "
                                                               "the run of median req/s (every run's req/s is kept)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "web_load.json"))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.repeats < 1:
        parser.error("--requests, --concurrency and --repeats must be positive")
    if not args.run and not args.synthetic:
        parser.error("give --run BUNDLE[@RUNTIME] (repeatable) or --synthetic N")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start_machine = machine()
    with tempfile.TemporaryDirectory() as scratch:
        queries, specs = None, list(args.run)
        if args.synthetic:
            bundle, queries = synthetic_bundle(args.synthetic, scratch)
            specs = [bundle, f"{bundle}@tf"]
        log_path = os.path.join(tempfile.gettempdir(), "web_load.server.log")  # the servers' output, for failures
        rows = [median_run([load_run(spec, args, queries, log_path) for _ in range(args.repeats)]) for spec in specs]
    head = rows[0]
    result = {**{key: head[key] for key in ("requests", "concurrency", "errors", "p50_ms", "p90_ms", "p99_ms", "rps",
                                            "index_size", "backbone", "image_size", "runtime", "workers",
                                            "threads_per_worker", "rss_mb_start", "rss_mb_end")},
              "k": args.k, "runs": rows, "goals": goals(rows),
              "queries": (f"{len(queries)} generated test images" if queries else
                          f"{args.queries} images of {args.query_dataset or 'each bundle'}"
                          + (f" ({args.query_split} split)" if args.query_split else "")),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO),
                                                                      *(argv or sys.argv[1:])]),
              "machine": start_machine, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_json(args.out, result, indent=2)
    write_markdown(os.path.splitext(args.out)[0] + ".md", result)
    logger.info("wrote %s: %s", args.out, result["goals"])
    return result


if __name__ == "__main__":
    main()
