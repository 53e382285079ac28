"""Run an evaluation protocol for a model: embed the collection (`features.embedding`), rank the database exactly,
score the rankings.

The ranking is exhaustive and exact (`search.index.ExactIndex`, the index that bundles of hashing models use too), so
the metrics measure the embedding, not an ANN index. Records follow the schema of `benchmarks/results/retrieval.json`
(see `make_record`) and are stored one per `RECORD_KEY` (`storage.RecordStore`).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np

from tf_retrieval.config import END_TO_END, ModelConfig, load_run, named_preprocessing, trunk_runs
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.search.index import build_index
from tf_retrieval.evaluation.metrics import RetrievalMetrics, map_at_r, relevance_matrix
from tf_retrieval.data.protocols import Protocol

logger = logging.getLogger(__name__)


def fit_pca(vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on `vectors` [n, d]: returns (mean [d], components [d, dim]); project with `(x - mean) @ components`."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if not 0 < dim <= min(vectors.shape):
        raise InvalidInputError(f"PCA dimension must be in 1..{min(vectors.shape)} for data of shape {vectors.shape}, got {dim}")
    mean = vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    return mean.astype(np.float32), vt[:dim].T.astype(np.float32)


def _ranked_relevance(database: np.ndarray, database_labels: np.ndarray, queries: np.ndarray | None,
                      query_labels: np.ndarray | None, metric: str, depth: int | None, chunk_size: int,
                      progress: bool = False):
    """Yields (relevance [c, columns], num_relevant [c]) a chunk of queries at a time: each query's exact ranking of
    the database, whole (`depth` None) or its first `depth` entries (the exact index breaks ties by id, here the
    database position, so a shorter ranking is the start of the whole one). Leave-one-out (`queries` None) drops each
    query's own entry."""
    from tqdm.auto import tqdm

    database_labels = np.asarray(database_labels)
    leave_one_out = queries is None
    if leave_one_out:
        queries, query_labels = database, database_labels
    query_labels = np.asarray(query_labels)
    if len(queries) != len(query_labels) or len(database) != len(database_labels):
        raise InvalidInputError(f"vectors and labels differ in length: queries {len(queries)} vs {len(query_labels)}, "
                         f"database {len(database)} vs {len(database_labels)}")
    index = build_index(database, metric=metric, backend="exact")
    classes, counts = np.unique(database_labels, return_counts=True)
    count_of = dict(zip(classes.tolist(), counts.tolist()))
    num_relevant = np.array([count_of.get(int(label), 0) for label in query_labels]) - int(leave_one_out)
    n = len(database)
    k = n if depth is None else min(n, depth + int(leave_one_out))
    for start in tqdm(range(0, len(queries), chunk_size), desc="ranking", unit="chunk", disable=not progress, leave=False):
        stop = min(start + chunk_size, len(queries))
        _, ids = index.search(queries[start:stop], k)
        if leave_one_out:  # drop each query's own entry from its ranking (or the last, where it ranked below k)
            keep = ids != np.arange(start, stop)[:, None]
            keep[keep.all(axis=1), -1] = False
            ids = ids[keep].reshape(stop - start, k - 1)
        yield relevance_matrix(query_labels[start:stop], database_labels[ids]), num_relevant[start:stop]


def rank_and_score(database: np.ndarray, database_labels: np.ndarray, queries: np.ndarray | None = None,
                   query_labels: np.ndarray | None = None, *, metric: str = "cosine", map_k: int | None = None,
                   chunk_size: int = 256, progress: bool = False) -> tuple[dict[str, float], dict[str, list]]:
    """Ranks the whole database for every query and returns (metrics, pr_curve).

    Args:
      database, database_labels: vectors [n, d] and int labels [n].
      queries, query_labels: [q, d] and [q]; None for leave-one-out (each database vector queries all the others).
      metric: similarity for ranking (see `index.METRICS`).
      map_k: also report mAP@map_k.
      chunk_size: queries ranked at a time (memory is chunk_size x n).

    Returns:
      metrics dict (`metrics.RetrievalMetrics.result`) and the averaged precision/recall curve.
    """
    accumulator = RetrievalMetrics(map_k=map_k)
    for relevance, num_relevant in _ranked_relevance(database, database_labels, queries, query_labels, metric, None,
                                                     chunk_size, progress):
        accumulator.update(relevance, num_relevant)
    return accumulator.result(), accumulator.pr_curve()


def map_at_r_score(database: np.ndarray, database_labels: np.ndarray, queries: np.ndarray | None = None,
                   query_labels: np.ndarray | None = None, metric: str = "cosine", chunk_size: int = 256) -> float:
    """MAP@R alone, as `rank_and_score` gives it, from rankings only R deep (R: the most relevant items any query has):
    validation during training and tuning, every epoch."""
    labels = np.asarray(database_labels)
    depth = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    totals, scored = 0.0, 0
    for relevance, num_relevant in _ranked_relevance(database, labels, queries, query_labels, metric, depth,
                                                     chunk_size):
        keep = num_relevant > 0  # queries without a relevant item are skipped, as in `rank_and_score`
        if keep.any():
            totals += float(map_at_r(relevance[keep], num_relevant[keep]).sum())
            scored += int(keep.sum())
    return totals / scored if scored else float("nan")


def leave_one_out_map_at_r(vectors: np.ndarray, labels: np.ndarray, metric: str = "cosine") -> float:
    """MAP@R of `vectors` when each one queries all the others (validation during training and tuning)."""
    return map_at_r_score(np.asarray(vectors), labels, metric=metric)


def evaluate_protocol(protocol: Protocol, features: np.ndarray, *, embed: Callable[[np.ndarray], np.ndarray] | None = None,
                      metric: str = "cosine", pca_dim: int | None = None, map_k: int | None = None,
                      expand: tuple[int, float] | None = None, augment: tuple[int, float] | None = None,
                      progress: bool = False) -> tuple[dict[str, float], dict[str, list], int]:
    """Scores a protocol given features of the whole collection.

    Args:
      protocol: positions of database and queries in the collection.
      features: one row per image of `protocol.collection`: finished vectors (`features.embedding.embed_collection`),
        or backbone features with `embed`.
      embed: maps features to vectors (e.g. `features.embedding.head_function`); None keeps them as they are.
      metric: ranking similarity ("hamming" for packed codes).
      pca_dim: reduce to this many dimensions with PCA fitted on the database first.
      expand: (k, alpha): α query expansion of the queries over their top-k in the database (protocols with queries).
      augment: (k, alpha): α database-side augmentation of the database first (protocols with separate queries: in
        leave-one-out, each query's own vector would leak into its neighbours').

    Returns:
      (metrics, pr_curve, embedding_dim): the dimension in bits for Hamming codes.
    """
    if len(features) != len(protocol.collection):
        raise InvalidInputError(f"{len(features)} feature rows for a collection of {len(protocol.collection)} images")
    positions = protocol.database if protocol.queries is None else np.concatenate([protocol.database, protocol.queries])
    vectors = np.asarray(features[positions])
    if embed is not None:
        vectors = np.asarray(embed(vectors))
    database, queries = vectors[:len(protocol.database)], vectors[len(protocol.database):]
    if metric == "hamming" and (pca_dim or expand or augment):
        raise InvalidInputError("PCA, query expansion and database augmentation work on float vectors, not on "
                                "binary codes")
    if (expand or augment) and protocol.queries is None:
        raise InvalidInputError(f"{protocol.name} is leave-one-out: query expansion and database augmentation need "
                                "separate queries")
    if pca_dim:
        mean, components = fit_pca(database, pca_dim)
        database, queries = (database - mean) @ components, (queries - mean) @ components
    from tf_retrieval.search.query import augment_database, expand_exact

    if augment:
        database = augment_database(database, *augment)
    if expand:
        queries = expand_exact(queries, database, *expand)
    labels = protocol.collection.labels
    metrics, curve = rank_and_score(
        database, labels[protocol.database],
        None if protocol.queries is None else queries, None if protocol.queries is None else labels[protocol.queries],
        metric=metric, map_k=map_k, progress=progress)
    dim = database.shape[1] * 8 if metric == "hamming" and database.dtype == np.uint8 else database.shape[1]
    return metrics, curve, int(dim)


#: Record variants of the search-side options (`search_variant`); the model's vectors are the same.
SEARCH_VARIANTS = ("alpha-qe", "alpha-dba", "alpha-dba+qe")


def search_variant(expand: int = 0, augment: int = 0) -> str | None:
    """The record variant for α query expansion over `expand` neighbours and α database augmentation over `augment`
    (0: off): None (plain ranking), alpha-qe, alpha-dba or alpha-dba+qe."""
    if not expand and not augment:
        return None
    return "alpha-" + "+".join(name for name, k in (("dba", augment), ("qe", expand)) if k)


def search_details(expand: int = 0, augment: int = 0, alpha: float = 3.0) -> dict:
    """The record fields of the search-side options: {} when both are off."""
    variant = search_variant(expand, augment)
    if variant is None:
        return {}
    return {"variant": variant, **({"expand": expand} if expand else {}), **({"dba": augment} if augment else {}),
            "alpha": alpha}


def make_record(protocol: str, model_config: ModelConfig, metrics: dict, *, embedding_dim: int, seconds: float,
                command: str, model: str = "baseline", **extra) -> dict:
    """One record of `benchmarks/results/retrieval.json` (`extra`: e.g. `run_details`, `code_details`)."""
    inputs = named_preprocessing(model_config.backbone, model_config.preprocessing)
    return {"protocol": protocol, "model": model, "backbone": model_config.backbone,
            "image_size": int(model_config.image_size), "pooling": model_config.pooling,
            **({"scales": list(model_config.scales)} if len(model_config.scales) > 1 else {}),
            **({"flip": True} if model_config.flip else {}),
            **({"preprocessing": inputs} if inputs else {}),
            "embedding_dim": int(embedding_dim), "weights": str(model_config.weights or "none"),
            "metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
            "seconds": round(float(seconds), 1), "command": command,
            "date": datetime.date.today().isoformat(), "machine": machine_description(), **extra}


def run_details(run_dir: str) -> dict:
    """What a record says of the training run a model comes from: its name, recipe, training figures (seconds in all
    and of them caching the frozen part's outputs) and the command that trained it (runs of older versions: None)."""
    train_config, model_config = load_run(run_dir)
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    earlier = earlier_runs(train_config.model.weights)
    validation = result["best_map_at_r"]  # None: a run that held out no validation split
    return {"run": os.path.basename(os.path.normpath(run_dir)), "train_from": model_config.train_from,
            "train_seconds": result["seconds"], "cache_seconds": result.get("cache_seconds"),
            "train_epochs": result["epochs"],
            "validation_map_at_r": None if validation is None else round(validation, 4),
            "train_command": result.get("command"), **({"starts_from": earlier} if earlier else {}),
            "config": train_config.to_dict()}


def earlier_runs(weights: str | None) -> list[dict]:
    """The training runs a run's starting weights come from, oldest first: a run that started from another run's
    fine-tuned trunk (`--weights RUN/finetuned-backbone-*.weights.h5`) is reproduced by their commands, in this order,
    before its own. Each: the run's name, training command and seconds. [] for ImageNet or unknown weights."""
    chain = []
    for run_dir in trunk_runs(weights):
        with open(os.path.join(run_dir, "result.json")) as f:
            result = json.load(f)
        chain.append({"run": os.path.basename(run_dir), "train_command": result.get("command"),
                      "train_seconds": result.get("seconds")})
    return chain[::-1]


def code_details(config: ModelConfig, vectors: np.ndarray) -> dict:
    """What a record says of a hashing model's codes (nothing for a float model)."""
    if not config.hash_bits:
        return {}
    return {"hash_bits": config.hash_bits, "bytes_per_image": int(vectors.shape[1]),
            "index": "exact Hamming index over packed codes (search.index.ExactIndex, metric hamming)"}


def machine_description() -> str:
    """CPU count, processor and OS, for benchmark records."""
    return f"{os.cpu_count()} cores {platform.machine()} {platform.system()} ({platform.processor() or 'cpu'})"


#: What identifies a record: the model, how its vectors were made, and the training run it comes from (one record per
#: run, so the runs of an ablation sit side by side).
RECORD_KEY = ("protocol", "model", "backbone", "image_size", "scales", "flip", "preprocessing", "pooling",
              "embedding_dim", "weights", "hash_bits", "variant", "train_from", "runtime", "run", "seed")


def records_markdown(records: Sequence[dict], columns: Sequence[str] = ("mAP", "MAP@R", "P@10", "R@1", "R@2", "R@4", "R@8")) -> str:
    """A Markdown table of records, one row each (the model column names the variant, codes and how deep training
    reached)."""
    header = ["protocol", "model", "backbone", "px", "pooling", "dim", "weights", "runtime", *columns, "s", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        values = [f"{r['metrics'][c]:.3f}" if isinstance(r["metrics"].get(c), (int, float)) else "–" for c in columns]
        model = (r["model"] + (f" + {r['variant']}" if r.get("variant") else "")
                 + (f" ({r['hash_bits']} bits)" if r.get("hash_bits") else "")
                 + {None: "", END_TO_END: " (end to end)"}.get(r.get("train_from"), " + top blocks"))
        weights = r["weights"] if r["weights"] in ("imagenet", "none") else "fine-tuned trunk"
        size = (str(r["image_size"]) + (f" x{'/'.join(f'{x:g}' for x in r['scales'])}" if r.get("scales") else "")
                + (" + flip" if r.get("flip") else "") + (f", {r['preprocessing']} inputs" if r.get("preprocessing")
                                                            else ""))
        lines.append("| " + " | ".join([r["protocol"], model, r["backbone"], size, r.get("pooling", ""),
                                        str(r["embedding_dim"]), weights, r.get("runtime", "tf"), *values,
                                        str(r.get("seconds", "")), r.get("run") or "–"]) + " |")
    return "\n".join(lines) + "\n"


def write_records_markdown(json_path: str, records: Sequence[dict]) -> str:
    """Writes the Markdown twin of a records file (`retrieval.json` -> `retrieval.md`): every record, the machines and
    the commands. Returns its path."""
    from tf_retrieval.storage import write_text

    lines = ["# Retrieval quality", "",
             "Every record of `" + os.path.basename(json_path) + "` (written by `tfr evaluate/compare --records` and "
             "`benchmarks/evaluate_baselines.py`; the training recipe of each fine-tuned row is in its JSON record, "
             "the ablation in `reports/compare/ablation.md`).",
             "Exact exhaustive ranking; relevance = same class; CIFAR-10 is the JPEG copy described in the data notes.",
             "Protocols: see DESIGN.md §2 and `tf_retrieval/data/protocols.py`. `s` = seconds to embed, rank and score "
             "(features cached).", "", records_markdown(records), ""]
    machines = sorted({r.get("machine", "?") for r in records})
    commands = sorted({r.get("command", "?") for r in records})
    lines += ["Machine(s): " + "; ".join(machines), "", "Commands:", ""] + [f"    {c}" for c in commands] + [""]
    path = os.path.splitext(json_path)[0] + ".md"
    write_text(path, "\n".join(lines))
    return path


def evaluate_model(protocol: Protocol, config: ModelConfig, *, workdir: str | None = None, pca_dim: int | None = None,
                   metric: str | None = None, batch_size: int = 64, command: str = "", model: str | None = None,
                   run_dir: str | None = None, progress: bool = True, runtime: str = "litert", expand: int = 0,
                   augment: int = 0, alpha: float = 3.0) -> dict:
    """Embeds the protocol's collection with `config` (`features.embedding.embed_collection`: the vectors `tfr index`
    builds bundles of) and scores `protocol`; returns a retrieval.json record.

    Args:
      metric: ranking similarity; default `config.metric` (Hamming over packed codes for a hashing model).
      model: the record's label; default finetuned for a model training made part of (`ModelConfig.fine_tuned`; a
        fine-tuned trunk without a head is the variant "trunk features"), else baseline.
      run_dir: the training run `config` comes from: the record gives its recipe and training figures (`run_details`).
      runtime: where the backbone runs (one of `features.litert.RUNTIMES`); the record names it.
      expand, augment, alpha: α query expansion over the top-`expand` and α database augmentation over `augment`
        neighbours (0: off; `search_variant` names the record's variant).
    """
    from tf_retrieval.features.embedding import embed_collection

    start = time.perf_counter()
    metric = metric or config.metric
    vectors = embed_collection(protocol.collection, config, workdir=workdir, batch_size=batch_size, progress=progress,
                               runtime=runtime)
    metrics, curve, dim = evaluate_protocol(protocol, vectors, metric=metric, pca_dim=pca_dim, progress=progress,
                                            expand=(expand, alpha) if expand else None,
                                            augment=(augment, alpha) if augment else None)
    logger.info("%s %s: %s", protocol.name, config.model_id(), metrics)
    extra = {"train_from": config.train_from, "runtime": runtime, **(run_details(run_dir) if run_dir else {}),
             **code_details(config, vectors), **search_details(expand, augment, alpha)}
    if config.fine_tuned and config.head is None:  # a fine-tuned trunk's own pooled features, without a head
        extra["variant"] = " + ".join(["trunk features"] + ([extra["variant"]] if "variant" in extra else []))
    return make_record(protocol.name, config, metrics, embedding_dim=dim, seconds=time.perf_counter() - start,
                       command=command, model=model or ("finetuned" if config.fine_tuned else "baseline"),
                       dataset=protocol.collection.name, metric=metric, pca_dim=pca_dim, pr_curve=curve,
                       queries=int(metrics.get("queries", 0)), **extra)
