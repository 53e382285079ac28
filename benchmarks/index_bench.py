"""Index at scale: our ScaNN configurations against exact search and FAISS, at matched recall@10.

For each size n (vectors of dimension --dim, cosine similarity) every system is built on the same database and asked the
same held-out queries:

- ``exact``: `tf_retrieval.search.index.ExactIndex` (numpy float32 matmul in bounded-memory chunks; the product's ground truth);
- ``faiss-flat``: FAISS IndexFlatIP (exact, BLAS), a second exact baseline;
- ``scann-auto``: `ScannIndex` with `scann_params(n)`, what `tfr index` builds (brute force below 20k points), at the
  default settings and at each `--targets` recall of `scann_params(..., target_recall=)`;
- ``scann-ah``, ``scann-tree_ah``, ``scann-tree_ah-2x``: `ScannIndex` with a forced mode (AH over every point; a k-means
  tree with sqrt(n) or 2 sqrt(n) leaves, then AH), swept over ScaNN's search-time settings (leaves searched, candidates
  re-scored for k=10: 40 and 100; also 20 and 300 with --full-sweep) with `ScannIndex.tune`, so one trained
  searcher gives a whole recall / QPS curve;
- ``faiss-ivf<nlist>``: IVF-Flat with nlist = 2^round(log2 sqrt n) lists (or `--ivf-lists`), nprobe swept;
- ``faiss-ivfpq``: ``IVF<nlist>,PQ<dim/2>x4fs,RFlat``: 4-bit fast-scan PQ (2 dimensions per sub-quantiser, 32 bytes a
  vector at 128-d: the counterpart of ScaNN's AH with dims_per_block=2) with exact re-ranking of k_factor * k
  candidates (the counterpart of ScaNN's reorder); nprobe swept for k_factor 4 and 10 (as many candidates
  re-scored as ScaNN's 40 and 100; also 2 and 50 with --full-sweep);
- ``faiss-hnsw32``: HNSW (M=32, efConstruction=40), efSearch swept.

Each sweep runs from the cheapest setting up and stops once recall@10 >= 0.99; settings below --min-recall (0.8) are
skipped.

Measured per setting: build_s (training + adding; search-time settings share their index's build), mem_mb (size of
the serialised index structure: FAISS `serialize_index`, ScaNN's own `serialize` directory, the vectors and ids for
exact; `ScannIndex` keeps another float32 copy of the vectors for `get_vectors` and retraining, not counted),
ms_single_p50/p99 (--single queries one at a time, k=10, through the public `search` of each library, on one
thread: BLAS and OpenMP limited to 1, as ScaNN's single-query search is), qps_batch (--queries queries in one call,
k=10, best of --repeats; every library uses all cores), recall@1/10/100 against the exact top-k (recall@1 and @10
from the k=10 search, @100 from a separate k=100 search).

Data:
- ``synthetic``: a Gaussian mixture of --clusters clusters (unit centres, each cluster's spread in a random 16-d subspace
  plus 20% isotropic noise, Dirichlet cluster weights), L2-normalised; queries are fresh samples of the same mixture.
  The same mixture at every n, so sizes are comparable.
- ``cifar10`` (only with --features PATH.npy, e.g. the cached CIFAR-10 embeddings under artifacts/features): rows
  shuffled (seeded), the last --queries rows are the queries, the first n the database (sizes above what the file holds
  are skipped); PCA to --dim fitted on the database, then L2-normalised.

Incremental updates (unless --no-updates): a ``scann-tree_ah`` index (default settings) is built on n points, then 10%
new points are added and 10% of the old ones deleted through ScaNN's mutation API (no retraining: 20% < the 25%
retraining threshold); its recall is compared with an index rebuilt from scratch on the same final set
(systems ``scann-updated`` / ``scann-rebuilt``).

Writes benchmarks/results/index.json (merged: a record replaces the earlier one of the same dataset, n, system and
settings), index.md and index_recall_qps.png. Run it on an otherwise idle machine; record what else ran.

    python benchmarks/index_bench.py --sizes 10000                        # quick check, well under a minute
    python benchmarks/index_bench.py --sizes 10000 100000 --features artifacts/features/<cifar10 embeddings>.npy
    python benchmarks/index_bench.py --sizes 1000000                      # the 1M run (tens of minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

import numpy as np

# FAISS parallelises with OpenMP, whose threads spin while waiting by default: on a machine shared with other work that
# spinning made FAISS IVF-PQ training 20x and its batched search 3x slower here. Passive waiting costs little on an
# idle machine; set OMP_WAIT_POLICY=ACTIVE to measure the default. Must be set before faiss is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tf_retrieval.storage import RecordStore, write_text  # noqa: E402 -- after the path

RESULTS = os.path.join(HERE, "results")
STOP_RECALL = 0.99  # a sweep stops once recall@10 reaches this
UPDATE_SYSTEMS = ("scann-updated", "scann-rebuilt")
MEASURED_PARAMS = ("update_s", "mutations")  # outcomes recorded in params, not settings


class IndexRecords(RecordStore):
    """index.json: one record per dataset, n, system and settings (`params` without `MEASURED_PARAMS`)."""

    def __init__(self, path: str):
        super().__init__(path, key=("dataset", "n", "system", "params"))

    def key_of(self, record: dict) -> tuple:
        settings = {k: v for k, v in record["params"].items() if k not in MEASURED_PARAMS}
        return record["dataset"], record["n"], record["system"], json.dumps(settings, sort_keys=True)


# -- data -------------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


class Mixture:
    """A clustered, L2-normalised Gaussian mixture: unit centres, each cluster spread mostly in its own subspace."""

    def __init__(self, dim: int, clusters: int, seed: int, local_dim: int = 16, isotropic: float = 0.2):
        rng = np.random.default_rng(seed)
        self.dim, self.clusters, self.local_dim, self.isotropic = dim, clusters, min(local_dim, dim), isotropic
        self.centres = _unit(rng.standard_normal((clusters, dim)))
        self.spread = rng.uniform(0.5, 1.0, clusters)
        self.bases = (rng.standard_normal((clusters, self.local_dim, dim)) / math.sqrt(dim)).astype(np.float32)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))

    def describe(self) -> str:
        return (f"synthetic Gaussian mixture ({self.clusters} clusters, local dim {self.local_dim}, "
                f"{self.isotropic:.0%} isotropic noise, L2-normalised, cosine)")

    def sample(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.choice(self.clusters, size=count, p=self.weights)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.clusters)
        out = np.empty((count, self.dim), np.float32)
        start = 0
        for c in np.flatnonzero(counts):
            m = int(counts[c])
            local = rng.standard_normal((m, self.local_dim)).astype(np.float32) @ self.bases[c] / math.sqrt(self.local_dim)
            noise = rng.standard_normal((m, self.dim)).astype(np.float32) / math.sqrt(self.dim)
            rows = self.centres[c] + self.spread[c] * (math.sqrt(1 - self.isotropic) * local
                                                       + math.sqrt(self.isotropic) * noise)
            out[order[start:start + m]] = rows
            start += m
        return _unit(out)


def synthetic_sets(sizes: list[int], args) -> Iterable[tuple[str, int, np.ndarray, np.ndarray, Callable[[int], np.ndarray]]]:
    mixture = Mixture(args.dim, args.clusters, args.seed)
    queries = mixture.sample(args.queries, seed=args.seed + 1)
    for n in sizes:
        yield (mixture.describe(), n, mixture.sample(n, seed=args.seed + 2 + n), queries,
               lambda count, n=n: mixture.sample(count, seed=args.seed + 3 + n))


def cifar_sets(sizes: list[int], args) -> Iterable[tuple[str, int, np.ndarray, np.ndarray, Callable[[int], np.ndarray]]]:
    features = np.load(args.features, mmap_mode="r")
    order = np.random.default_rng(args.seed).permutation(len(features))
    available = len(features) - args.queries
    name = os.path.splitext(os.path.basename(args.features))[0]
    for n in sizes:
        if n > available:
            print(f"cifar10: skipping n={n:,}: {args.features} holds {len(features):,} rows "
                  f"({available:,} after {args.queries} queries)", flush=True)
            continue
        database = np.asarray(features[np.sort(order[:n])], dtype=np.float64)
        mean = database.mean(axis=0)
        _, vectors = np.linalg.eigh(np.cov(database - mean, rowvar=False))
        components = vectors[:, ::-1][:, :args.dim]

        def project(rows: np.ndarray) -> np.ndarray:
            return _unit(((np.asarray(rows, np.float64) - mean) @ components).astype(np.float32))

        queries = project(features[np.sort(order[available:])])
        extra = np.sort(order[n:available])

        def new_points(count: int, extra=extra, project=project) -> np.ndarray:
            if count > len(extra):
                raise ValueError(f"only {len(extra)} unused rows for {count} new points")
            return project(features[extra[:count]])

        yield (f"cifar10 embeddings {name} (PCA to {args.dim} fitted on the database, L2-normalised, cosine)", n,
               project(database), queries, new_points)


# -- measuring ----------------------------------------------------------------------------------------------------------
def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = [np.intersect1d(f[:k], t[:k]).size for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


class one_thread:
    """Limits BLAS and OpenMP (numpy, FAISS) to one thread, for single-query latency (ScaNN's is single-threaded)."""

    def __enter__(self):
        self._limits = None
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(1)
        except ImportError:
            pass
        try:
            import faiss

            self._faiss = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
        except ImportError:
            self._faiss = None
        return self

    def __exit__(self, *exc):
        if self._faiss is not None:
            import faiss

            faiss.omp_set_num_threads(self._faiss)
        if self._limits is not None:
            self._limits.restore_original_limits()


def measure(search: Callable[[np.ndarray, int], np.ndarray], queries: np.ndarray, truth: np.ndarray,
            args) -> dict | None:
    """Recall, batched QPS and single-query latency of `search(queries, k) -> ids`; None below --min-recall."""
    best = math.inf
    for repeat in range(max(1, args.repeats)):  # the best of the runs: the first one also warms up
        start = time.perf_counter()
        found = search(queries, 10)
        best = min(best, time.perf_counter() - start)
        if repeat == 0 and recall(found, truth, 10) < args.min_recall:
            return None
    found_100 = search(queries, 100)
    latencies = []
    with one_thread():
        for row in queries[:args.single]:
            one = row[None, :]
            start = time.perf_counter()
            search(one, 10)
            latencies.append((time.perf_counter() - start) * 1000)
    return {"ms_single_p50": round(float(np.percentile(latencies, 50)), 4),
            "ms_single_p99": round(float(np.percentile(latencies, 99)), 4),
            "qps_batch": round(len(queries) / best, 1),
            "recall@1": round(recall(found, truth, 1), 4), "recall@10": round(recall(found, truth, 10), 4),
            "recall@100": round(recall(found_100, truth, 100), 4)}


def _dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def scann_mem_mb(index) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        index._searcher.serialize(tmp)
        return _dir_mb(tmp)


def faiss_mem_mb(index) -> float:
    import faiss

    return faiss.serialize_index(index).nbytes / 2**20


def geometric(limit: int, start: int = 1, ratio: float = 1.5) -> list[int]:
    values, value = [], float(start)
    while round(value) < limit:
        if not values or round(value) > values[-1]:
            values.append(int(round(value)))
        value *= ratio
    return values + [limit]


class Runner:
    """Builds systems, sweeps their search-time settings and collects records for one (dataset, n)."""

    def __init__(self, dataset: str, database: np.ndarray, queries: np.ndarray, truth: np.ndarray, args, common: dict):
        self.dataset, self.database, self.queries, self.truth, self.args = dataset, database, queries, truth, args
        self.n, self.dim = database.shape
        self.common = common
        self.records: list[dict] = []

    def wanted(self, system: str) -> bool:
        return not self.args.systems or any(system.startswith(s) for s in self.args.systems)

    def run(self, system: str, build: Callable[[], Any], search: Callable[[Any, np.ndarray, int], np.ndarray],
            mem: Callable[[Any], float], params: Callable[[Any], dict],
            chains: list[list[Callable[[Any], None]]] = ((lambda obj: None,),)) -> None:
        if not self.wanted(system):
            return
        start = time.perf_counter()
        obj = build()
        build_s = time.perf_counter() - start
        mem_mb = mem(obj)
        print(f"  {system}: built in {build_s:.1f} s, {mem_mb:.1f} MB", flush=True)
        for chain in chains:
            for apply in chain:
                apply(obj)
                figures = measure(lambda q, k: search(obj, q, k), self.queries, self.truth, self.args)
                if figures is None:  # below --min-recall: not timed, not recorded
                    continue
                self.add(system, params(obj), build_s, mem_mb, figures)
                if figures["recall@10"] >= STOP_RECALL:
                    break
        print(f"  {system}: done in {time.perf_counter() - start:.1f} s", flush=True)
        del obj
        gc.collect()

    def add(self, system: str, params: dict, build_s: float, mem_mb: float, figures: dict) -> None:
        record = {"system": system, "n": int(self.n), "dim": int(self.dim), "params": params,
                  "build_s": round(build_s, 3), "mem_mb": round(mem_mb, 2), **figures, **self.common,
                  "dataset": self.dataset}
        self.records.append(record)
        print(f"    {json.dumps(params, sort_keys=True)}: recall@10 {figures['recall@10']:.4f}, "
              f"{figures['qps_batch']:,.0f} QPS, p50 {figures['ms_single_p50']:.3f} ms", flush=True)


def run_exact(r: Runner) -> None:
    from tf_retrieval.search.index import build_index

    r.run("exact", lambda: build_index(r.database, backend="exact"), lambda idx, q, k: idx.search(q, k)[1],
          lambda idx: (idx._vectors.nbytes + idx._ids.nbytes) / 2**20, lambda idx: {"implementation": "numpy matmul"})


def run_scann(r: Runner) -> None:
    from tf_retrieval.search.index import ScannIndex, scann_params

    n = r.n

    def build(params):
        def make():
            index = ScannIndex(r.dim, "cosine", params=params)
            index.add(r.database, np.arange(n))
            index.rebuild()
            return index
        return make

    def search(index, q, k):
        return index.search(q, k)[1]

    def params(index):
        return dict(index.built_params)

    def tune(**settings):
        return lambda index: index.tune(**settings)

    # what `tfr index` builds: scann_params(n) at its default target recall, then (search-time settings only, same
    # trained searcher) at each --targets recall
    state: dict[str, Any] = {"target": None}

    def target(value):
        def apply(index):
            state["target"] = value
            settings = scann_params(n, r.dim, "cosine", target_recall=value)
            index.tune(**{k: settings[k] for k in ("leaves_to_search", "reorder") if k in index.built_params})
        return apply

    chains = [[target(None)]] + ([[target(t)] for t in r.args.targets] if n >= 20_000 else [])
    r.run("scann-auto", build(None), search, scann_mem_mb,
          lambda index: {**index.built_params, "target_recall": state["target"]}, chains)
    r.run("scann-ah", build({"mode": "ah"}), search, scann_mem_mb, params,
          [[tune(reorder=v) for v in (20, 40, 100, 250, 1000)]])
    for system, factor in (("scann-tree_ah", 1), ("scann-tree_ah-2x", 2)):
        leaves = max(1, int(round(factor * math.sqrt(n))))
        reorders = (20, 40, 100, 300) if r.args.full_sweep else (40, 100)
        chains = [[tune(reorder=reorder, leaves_to_search=v) for v in geometric(leaves)] for reorder in reorders]
        r.run(system, build({"mode": "tree_ah", "num_leaves": leaves}), search, scann_mem_mb, params, chains)


def run_faiss(r: Runner) -> None:
    try:
        import faiss
    except ImportError:
        print('  faiss is not installed (pip install "tf_retrieval[bench]"): FAISS systems skipped', flush=True)
        return
    dim, n = r.dim, r.n
    data = np.ascontiguousarray(r.database)

    def search(index, q, k):
        return index.search(np.ascontiguousarray(q), k)[1]

    def built(index):
        if not index.is_trained:
            index.train(data)
        index.add(data)
        return index

    r.run("faiss-flat", lambda: built(faiss.IndexFlatIP(dim)), search, faiss_mem_mb, lambda idx: {"index": "Flat"})
    default_lists = 2 ** int(round(math.log2(math.sqrt(n))))
    for nlist in r.args.ivf_lists or [default_lists]:
        if nlist * 39 > n:
            print(f"  faiss-ivf{nlist}: {n:,} points are too few to train {nlist} lists; skipped", flush=True)
            continue
        probes = [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p < nlist]
        probes.append(nlist)

        def set_probe(p):
            def apply(index):
                faiss.extract_index_ivf(index).nprobe = p
            return apply

        def ivf_params(index, nlist=nlist):
            return {"index": f"IVF{nlist},Flat", "nlist": nlist, "nprobe": faiss.extract_index_ivf(index).nprobe}

        r.run(f"faiss-ivf{nlist}",
              lambda nlist=nlist: built(faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)),
              search, faiss_mem_mb, ivf_params, [[set_probe(p) for p in probes]])
        if nlist == (r.args.ivf_lists or [default_lists])[0] and r.wanted("faiss-ivfpq"):
            spec = f"IVF{nlist},PQ{dim // 2}x4fs,RFlat"

            def set_pq(p, k_factor):
                def apply(index):
                    faiss.extract_index_ivf(index).nprobe = p
                    index.k_factor = k_factor
                return apply

            def pq_params(index, spec=spec, nlist=nlist):
                return {"index": spec, "nlist": nlist, "nprobe": faiss.extract_index_ivf(index).nprobe,
                        "k_factor": index.k_factor}

            r.run("faiss-ivfpq", lambda spec=spec: built(faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)),
                  search, faiss_mem_mb, pq_params,
                  [[set_pq(p, kf) for p in probes] for kf in ((2, 4, 10, 50) if r.args.full_sweep else (4, 10))])

    def hnsw():
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        return built(index)

    def set_ef(ef):
        def apply(index):
            index.hnsw.efSearch = ef
        return apply

    r.run("faiss-hnsw32", hnsw, search, faiss_mem_mb,
          lambda idx: {"index": "HNSW32,Flat", "M": 32, "efConstruction": idx.hnsw.efConstruction,
                       "efSearch": idx.hnsw.efSearch},
          [[set_ef(ef) for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)]])


def run_updates(r: Runner, new_points: Callable[[int], np.ndarray]) -> None:
    """10% adds + 10% deletes through ScaNN's mutation API vs a rebuild on the same final set."""
    from tf_retrieval.search.index import ExactIndex, ScannIndex

    n, change = r.n, max(1, r.n // 10)
    args = argparse.Namespace(**{**vars(r.args), "min_recall": 0.0})  # always record both
    fresh = new_points(change)
    rng = np.random.default_rng(r.args.seed)
    deleted = rng.choice(n, size=change, replace=False)
    keep = np.setdiff1d(np.arange(n), deleted)
    final_ids = np.concatenate([keep, np.arange(n, n + change)])
    final_vectors = np.concatenate([r.database[keep], fresh])
    truth_index = ExactIndex(r.dim, "cosine")
    truth_index.add(final_vectors, final_ids)
    truth = truth_index.search(r.queries, 100)[1]
    del truth_index
    leaves = max(1, int(round(math.sqrt(n))))
    params = {"mode": "tree_ah", "num_leaves": leaves}

    start = time.perf_counter()
    index = ScannIndex(r.dim, "cosine", params=params)
    index.add(r.database, np.arange(n))
    index.rebuild()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    index.add(fresh, np.arange(n, n + change))
    index.delete(deleted)
    update_s = time.perf_counter() - start
    mutations = index._built.get("mutations") if index._searcher is not None else None
    if mutations != 2 * change:
        print(f"  warning: the ScaNN searcher was retrained during the updates ({mutations})", flush=True)
    runner = Runner(r.dataset, final_vectors, r.queries, truth, r.args, r.common)
    runner.n = n
    figures = measure(lambda q, k: index.search(q, k)[1], r.queries, truth, args)
    runner.add("scann-updated", {**index.built_params, "built_on": n, "added": change, "deleted": change,
                                 "update_s": round(update_s, 3), "mutations": mutations}, build_s, scann_mem_mb(index),
               figures)
    del index
    start = time.perf_counter()
    index = ScannIndex(r.dim, "cosine", params=params)
    index.add(final_vectors, final_ids)
    index.rebuild()
    build_s = time.perf_counter() - start
    figures = measure(lambda q, k: index.search(q, k)[1], r.queries, truth, args)
    runner.add("scann-rebuilt", {**index.built_params, "built_on": n}, build_s, scann_mem_mb(index), figures)
    r.records.extend(runner.records)


# -- reporting ----------------------------------------------------------------------------------------------------------
def best_at(records: list[dict], system: str, target: float) -> dict | None:
    hits = [x for x in records if x["system"] == system and x["recall@10"] >= target]
    return max(hits, key=lambda x: x["qps_batch"]) if hits else None


def summary(records: list[dict], target: float) -> list[str]:
    """Per (dataset, n): each system's fastest setting at recall@10 >= target, and the goal of issue 8."""
    lines = []
    groups = sorted({(x["dataset"], x["n"]) for x in records}, key=lambda g: (not g[0].startswith("synthetic"), g))
    for dataset, n in groups:
        rows = [x for x in records if x["dataset"] == dataset and x["n"] == n and x["system"] not in UPDATE_SYSTEMS]
        exact = best_at(rows, "exact", 0) or {}
        exact_qps = exact.get("qps_batch")
        lines += ["", f"### {dataset}, n = {n:,}", "",
                  f"Fastest setting of each system with recall@10 >= {target} (exact: {exact_qps or float('nan'):,.0f} QPS):",
                  "", "| system | params | recall@10 | QPS (batch) | x exact | p50 ms | p99 ms | build s | MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for system in sorted({x["system"] for x in rows}):
            best = best_at(rows, system, target)
            if best is None:
                top = max((x for x in rows if x["system"] == system), key=lambda x: x["recall@10"])
                lines.append(f"| {system} | never reaches {target} (best recall@10 {top['recall@10']:.4f}) | | | | | | | |")
                continue
            ratio = f"{best['qps_batch'] / exact_qps:,.1f}" if exact_qps else ""
            lines.append(f"| {system} | {_short(best['params'])} | {best['recall@10']:.4f} | {best['qps_batch']:,.0f} | "
                         f"{ratio} | {best['ms_single_p50']:.3f} | {best['ms_single_p99']:.3f} | {best['build_s']:.1f} | "
                         f"{best['mem_mb']:.0f} |")
        scann = [b for s in {x["system"] for x in rows} if s.startswith("scann") and (b := best_at(rows, s, target))]
        faiss = [b for s in {x["system"] for x in rows} if s.startswith("faiss") and (b := best_at(rows, s, target))]
        if scann and exact_qps:
            top = max(scann, key=lambda x: x["qps_batch"])
            verdict = (f"**Goal** (ScaNN recall@10 >= {target} at >= 100x exact QPS and faster than every FAISS index "
                       f"at that recall): best ScaNN {top['system']} {top['qps_batch']:,.0f} QPS = "
                       f"{top['qps_batch'] / exact_qps:,.0f}x exact")
            flat = best_at(rows, "faiss-flat", 0)
            if flat:
                verdict += f" ({top['qps_batch'] / flat['qps_batch']:,.0f}x FAISS Flat)"
            if faiss:
                best_faiss = max(faiss, key=lambda x: x["qps_batch"])
                verdict += (f"; best FAISS {best_faiss['system']} {best_faiss['qps_batch']:,.0f} QPS "
                            f"(ScaNN/FAISS = {top['qps_batch'] / best_faiss['qps_batch']:.2f})")
            met = top["qps_batch"] >= 100 * exact_qps and all(top["qps_batch"] > f["qps_batch"] for f in faiss)
            lines += ["", verdict + (" — met." if met else " — not met.")]
    updates = [x for x in records if x["system"] in UPDATE_SYSTEMS]
    if updates:
        lines += ["", "### Incremental updates (ScaNN tree_ah, 10% adds + 10% deletes without retraining vs a rebuild)",
                  "", "| dataset | n | system | recall@1 | recall@10 | recall@100 | QPS (batch) | build s | update s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for x in sorted(updates, key=lambda x: (x["dataset"], x["n"], x["system"] != "scann-updated")):
            lines.append(f"| {x['dataset'].split(' (')[0]} | {x['n']:,} | {x['system']} | {x['recall@1']:.4f} | "
                         f"{x['recall@10']:.4f} | {x['recall@100']:.4f} | {x['qps_batch']:,.0f} | {x['build_s']:.1f} | "
                         f"{x['params'].get('update_s', '')} |")
    return lines


def _short(params: dict) -> str:
    keep = ("mode", "num_leaves", "leaves_to_search", "reorder", "index", "nprobe", "k_factor", "efSearch")
    return ", ".join(f"{k}={params[k]}" for k in keep if k in params)


def write_markdown(records: list[dict], path: str, target: float) -> None:
    first = records[0] if records else {}
    lines = ["# Index at scale: ScaNN vs exact vs FAISS", "",
             f"Machine: {first.get('machine', '?')}; versions: {json.dumps(first.get('versions', {}))}; "
             f"environment: {json.dumps(first.get('env', {}))} (FAISS's OpenMP threads wait passively).",
             "QPS = queries per second of one batched call (all cores), p50/p99 = single-query latency, recall against "
             "exact top-k; sweeps of search-time settings share their index's build. Generated by "
             "`benchmarks/index_bench.py` (see its docstring); commands:", ""]
    loaded = [x["machine"] for x in records if "load average" in x.get("machine", "")]
    if loaded:
        lines[3:3] = ["On a machine shared with other work (see the load average) QPS of the same setting varied up to 2x "
                      "between runs: compare systems within one run, and prefer runs on an idle machine.", ""]
    for command in sorted({x["command"] for x in records}):
        lines.append(f"    {command}")
    lines += summary(records, target)
    lines += ["", "## All measured settings", "",
              "| dataset | n | system | params | recall@1 | recall@10 | recall@100 | QPS | p50 ms | p99 ms | build s | MB |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in records:
        lines.append(f"| {x['dataset'].split(' (')[0]} | {x['n']:,} | {x['system']} | {_short(x['params'])} | "
                     f"{x['recall@1']:.4f} | {x['recall@10']:.4f} | {x['recall@100']:.4f} | {x['qps_batch']:,.0f} | "
                     f"{x['ms_single_p50']:.3f} | {x['ms_single_p99']:.3f} | {x['build_s']:.1f} | {x['mem_mb']:.0f} |")
    write_text(path, "\n".join(lines) + "\n")


def plot(records: list[dict], path: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [x for x in records if x["system"] not in UPDATE_SYSTEMS]
    groups = sorted({(x["dataset"], x["n"]) for x in records}, key=lambda g: (not g[0].startswith("synthetic"), g))
    if not groups:
        return
    systems = sorted({x["system"] for x in records}, key=lambda s: (not s.startswith("exact"), s.startswith("scann"), s))
    markers = dict(zip(systems, "os^DvP<>pX*hd8H+x"))
    faiss_colours = iter(["#1f4e99", "#2a9d8f", "#4c8fd6", "#6a3d9a", "#8fb8de", "#264653"])
    scann_colours = iter(["#d62828", "#f77f00", "#c2185b", "#e9a23b", "#8d0801", "#ff6f91"])
    colours = {}
    for system in systems:
        if system in ("exact", "faiss-flat"):
            colours[system] = "black" if system == "exact" else "#7f7f7f"
        else:
            colours[system] = next(scann_colours if system.startswith("scann") else faiss_colours, "#999999")
    columns_of_panels = min(3, len(groups))
    panel_rows = math.ceil(len(groups) / columns_of_panels)
    width, height = max(6.5, 5.2 * columns_of_panels), 4.2 * panel_rows + 0.6
    fig, axes = plt.subplots(panel_rows, columns_of_panels, figsize=(width, height), squeeze=False)
    flat_axes = axes.ravel()
    for ax in flat_axes[len(groups):]:
        ax.set_visible(False)
    for ax, (dataset, n) in zip(flat_axes, groups):
        for system in systems:
            rows = sorted((x for x in records if x["system"] == system and x["dataset"] == dataset and x["n"] == n),
                          key=lambda x: x["recall@10"])
            if not rows:
                continue
            ax.plot([x["recall@10"] for x in rows], [x["qps_batch"] for x in rows], marker=markers[system],
                    linestyle="none", color=colours[system], label=system, markersize=5, alpha=0.9)
            frontier, best = [], 0.0  # Pareto front: the fastest setting at each recall or better
            for x in reversed(rows):
                if x["qps_batch"] > best:
                    best = x["qps_batch"]
                    frontier.append(x)
            if len(frontier) > 1:
                ax.plot([x["recall@10"] for x in frontier], [x["qps_batch"] for x in frontier], color=colours[system],
                        linewidth=0.8, alpha=0.6)
        ax.axvline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_title(f"{dataset.split(' (')[0].split(' embeddings')[0]}, n = {n:,}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("QPS (batched, log scale)")
    handles, labels = [], []
    for ax in flat_axes[:len(groups)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    columns = max(1, min(len(labels), int(width // 1.6)))
    legend_rows = math.ceil(len(labels) / columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.1) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    from tf_retrieval.evaluation.evaluate import machine_description

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    load = ", load average %.1f at start" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{machine_description()} {model}{load}".strip()


def versions() -> dict:
    import scann

    found = {"numpy": np.__version__, "scann": getattr(scann, "__version__", "1.4.2"), "python": platform.python_version()}
    try:
        import faiss

        found["faiss"] = faiss.__version__
    except ImportError:
        pass
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000, help="queries of the batched search (and recall)")
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="timed batched runs (k=10); the fastest counts")
    parser.add_argument("--clusters", type=int, default=1000, help="clusters of the synthetic mixture")
    parser.add_argument("--features", help="a .npy of CIFAR-10 embeddings [N, D]: also run on them (PCA to --dim)")
    parser.add_argument("--no-synthetic", action="store_true", help="only the --features data")
    parser.add_argument("--systems", nargs="+", help="only systems whose name starts with one of these")
    parser.add_argument("--ivf-lists", type=int, nargs="+", help="FAISS IVF list counts (default 2^round(log2 sqrt n))")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.99],
                        help="target recalls of scann_params for the scann-auto points")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 at which systems are compared")
    parser.add_argument("--min-recall", type=float, default=0.8,
                        help="settings below this recall@10 are skipped (not timed, not recorded)")
    parser.add_argument("--no-updates", action="store_true", help="skip the incremental-update measurement")
    parser.add_argument("--full-sweep", action="store_true",
                        help="also sweep ScaNN trees with 20 and 300 candidates re-scored, FAISS IVF-PQ with k_factor 2 "
                             "and 50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)

    from tf_retrieval.search.index import ExactIndex

    common = {"command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/index_bench.py"] + sys.argv[1:]),
              "machine": machine(), "date": datetime.date.today().isoformat(), "versions": versions(),
              "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}}
    print(f"{common['machine']}; {common['versions']}", flush=True)
    sets = [] if args.no_synthetic else [synthetic_sets(args.sizes, args)]
    if args.features:
        sets.append(cifar_sets(args.sizes, args))
    elif args.no_synthetic:
        parser.error("--no-synthetic needs --features")
    records: list[dict] = []
    for source in sets:
        for dataset, n, database, queries, new_points in source:
            print(f"{dataset}: n = {n:,}, dim {database.shape[1]}, {len(queries)} queries", flush=True)
            truth_index = ExactIndex(database.shape[1], "cosine")
            truth_index.add(database, np.arange(n))
            truth = truth_index.search(queries, 100)[1]
            del truth_index
            runner = Runner(dataset, database, queries, truth, args, common)
            run_exact(runner)
            run_faiss(runner)
            run_scann(runner)
            if not args.no_updates and (not args.systems or any(s.startswith("scann") for s in args.systems)):
                run_updates(runner, new_points)
            records.extend(runner.records)
            del database, runner
            gc.collect()

    json_path = os.path.join(args.out_dir, "index.json")
    merged = sorted(IndexRecords(json_path).merge(records),
                    key=lambda x: (not x["dataset"].startswith("synthetic"), x["dataset"], x["n"], x["system"]))
    write_markdown(merged, os.path.join(args.out_dir, "index.md"), args.target)
    plot(merged, os.path.join(args.out_dir, "index_recall_qps.png"), args.target)
    print("\n".join(summary(records, args.target)))
    print(f"wrote {json_path}, index.md, index_recall_qps.png ({len(merged)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
