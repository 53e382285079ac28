"""Baseline vs fine-tuned: one report per set of training runs (Markdown + JSON + PNG figures).

For every run (a protocol and the model trained for it) the report holds, for the frozen baseline and the fine-tuned
model on the same protocol: the metric table (also with α query expansion where the protocol has separate queries),
precision-recall curves, a PCA map of both embedding spaces, and query -> top-10 grids side by side. Everything is
computed from cached features, so re-running `tfr compare` regenerates the report in minutes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import numpy as np

from tf_retrieval.evaluation.evaluate import (RECORD_KEY, SEARCH_VARIANTS, code_details, evaluate_protocol, make_record,
                                              records_markdown, run_details, search_details)
from tf_retrieval.features.embedding import embed_collection
from tf_retrieval.data.protocols import Protocol, load_protocol
from tf_retrieval.storage import RecordStore, record_key, write_text
from tf_retrieval.config import END_TO_END, ModelConfig, TrainConfig, load_run
from tf_retrieval.errors import InvalidInputError

logger = logging.getLogger(__name__)


def protocol_vectors(protocol: Protocol, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(database vectors, query vectors) of a protocol (queries = database for leave-one-out protocols)."""
    database = vectors[protocol.database]
    return database, database if protocol.queries is None else vectors[protocol.queries]


def trained_model(path: str) -> tuple[TrainConfig, ModelConfig, dict]:
    """(training config, model config, what its records say of it) of a training run directory, or of a model
    directory written by `tfr adapt` from one (recorded as that run's model, with the adaptation as its variant)."""
    from tf_retrieval.training.adapt import adaptation_details

    adaptation = adaptation_details(os.path.join(path, "model.json"))
    if not adaptation:
        train_config, model_config = load_run(path)
        return train_config, model_config, run_details(path)
    run_dir = adaptation.pop("run_dir")
    adaptation.pop("model")
    if not run_dir:
        raise InvalidInputError(f"{path} adapts a baseline: compare the training run it is fused with instead")
    train_config, _ = load_run(run_dir)
    details = {**run_details(run_dir), **adaptation, "run": os.path.basename(os.path.normpath(path)),
               "source_run": os.path.basename(os.path.normpath(run_dir))}
    return train_config, ModelConfig.load(os.path.join(path, "model.json")), details


def baseline_of(train_config: TrainConfig) -> ModelConfig:
    """The frozen baseline a run is compared with: the model it started from, with ImageNet weights when it started
    from a fine-tuned trunk (a weights file), so the report shows what fine-tuning added in all."""
    base = train_config.base_model()
    if base.weights not in (None, "imagenet"):
        base = dataclasses.replace(base, weights="imagenet")
    return base


def compare_run(run_dir: str, out_dir: str, *, workdir: str, command: str = "", expand: int = 5, augment: int = 0,
                alpha: float = 3.0, grid_queries: int = 4, seed: int = 0, protocol: Protocol | None = None,
                baseline_cache: dict | None = None, label: str = "finetuned", runtime: str = "litert",
                flip: bool | None = None) -> list[dict]:
    """Scores baseline and fine-tuned on the run's protocol, draws its figures into `out_dir`; returns the records.

    `run_dir` is a training run, or a model directory that `tfr adapt` made from one. `baseline_cache` (a dict shared
    between runs) keeps baseline scores, so runs on the same protocol rank it once. `label` names the trained model in
    the records ("finetuned"; "tuned" for a configuration found by `tfr tune`); `runtime` runs the backbone; `flip`
    turns test-time flip (`ModelConfig.flip`) on or off for both models (None: both as the run's model has it); a
    model with flip has its figures in `<run>-flip-*.png`. Where the protocol has separate queries, each model is also
    scored with α query expansion over the top-`expand` (variant alpha-qe) and, with `augment`, with α database
    augmentation over `augment` neighbours as well (alpha-dba+qe).
    """
    from tf_retrieval.training.adapt import check_adapted_features

    baseline_cache = {} if baseline_cache is None else baseline_cache
    train_config, model_config, details = trained_model(run_dir)
    protocol = protocol or load_protocol(train_config.protocol, train_config.source)
    flip = model_config.flip if flip is None else flip  # the two models are compared on the same views
    base, model_config = (dataclasses.replace(config, flip=flip) for config in (baseline_of(train_config), model_config))
    check_adapted_features(os.path.join(run_dir, "model.json"), model_config)
    configs = {"baseline": base, label: model_config}
    # the vectors `tfr index` would build bundles of (a trained trunk's features are cached like any backbone's)
    vectors = {model: embed_collection(protocol.collection, config, workdir=workdir, runtime=runtime)
               for model, config in configs.items()}
    metrics_of = {model: config.metric for model, config in configs.items()}
    extra = {"run": details["run"], "dataset": protocol.collection.name, "runtime": runtime}
    records, curves, spaces = [], {}, {}
    for model, rank_metric in metrics_of.items():
        adapted = model == label and details.get("variant")
        can_expand = expand and protocol.queries is not None and rank_metric != "hamming" and not adapted
        variants = [(0, 0)]  # (α-QE neighbours, α-DBA neighbours)
        if can_expand:
            variants += [(expand, 0)] + ([(expand, augment)] if augment else [])
        for k, dba in variants:
            options = search_details(k, dba, alpha)
            start = time.perf_counter()
            key = (protocol.name, protocol.collection.name, base.model_id(), rank_metric, k, dba, alpha)
            if model == "baseline" and key in baseline_cache:
                metrics, curve, dim = baseline_cache[key]
            else:
                metrics, curve, dim = evaluate_protocol(protocol, vectors[model], metric=rank_metric,
                                                        expand=(k, alpha) if k else None,
                                                        augment=(dba, alpha) if dba else None)
            if model == "baseline":
                baseline_cache[key] = metrics, curve, dim
            # each model's record describes its own config (weights included), as `tfr evaluate`'s does: one key
            record = make_record(protocol.name, configs[model], metrics, embedding_dim=dim,
                                 seconds=time.perf_counter() - start, command=command, model=model, pr_curve=curve,
                                 queries=int(metrics["queries"]), **extra)
            record.update(options)
            if model == label:
                record.update(details, **code_details(model_config, vectors[model]))
            records.append(record)
            curves[(model, options.get("variant"))] = curve
            logger.info("%s %s%s: mAP %.4f MAP@R %.4f", protocol.name, model,
                        f" ({options['variant']})" if options else "", metrics["mAP"], metrics["MAP@R"])
        spaces[model] = protocol_vectors(protocol, vectors[model])
    stem = os.path.join(out_dir, figures_name(extra["run"], model_config.flip))
    plot_pr_curves(curves, f"{protocol.name}: precision-recall", f"{stem}-pr.png")
    plot_embedding_maps(spaces, protocol, f"{stem}-map.png", seed=seed)
    plot_query_grids(spaces, protocol, f"{stem}-grid.png", queries=grid_queries, seed=seed,
                     metrics=metrics_of)
    return records


def compare(run_dirs: Sequence[str], out_dir: str, *, workdir: str, command: str = "", expand: int = 5,
            augment: int = 0, alpha: float = 3.0, label: str = "finetuned", runtime: str = "litert",
            flip: bool | None = None) -> list[dict]:
    """`compare_run` for every run, then `report.json` and `report.md` in `out_dir`.

    Runs compared earlier into the same `out_dir` stay in the report (a run compared again replaces its records key by
    key), so runs can be added one at a time. Returns this call's records.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = RecordStore(os.path.join(out_dir, "report.json"), key=RECORD_KEY)
    report.load()  # a damaged report fails now, not after the evaluation
    records, baseline_cache = [], {}
    for run_dir in run_dirs:
        records += compare_run(run_dir, out_dir, workdir=workdir, command=command, expand=expand, augment=augment,
                               alpha=alpha, baseline_cache=baseline_cache, label=label, runtime=runtime, flip=flip)
    merged = report.merge(records)
    write_text(os.path.join(out_dir, "report.md"), report_markdown(merged, out_dir))
    return records


def report_markdown(records: Sequence[dict], out_dir: str) -> str:
    """The report: metric table, what each fine-tuned model is, and the figures."""
    rows, seen_baselines = [], set()
    for r in records:  # a protocol's baseline once, however many runs share it
        key = record_key(r, [field for field in RECORD_KEY if field != "run"])
        if r["model"] == "baseline" and key in seen_baselines:
            continue
        if r["model"] == "baseline":
            seen_baselines.add(key)
        rows.append(r)
    lines = ["# Baseline vs fine-tuned", "",
             "Frozen ImageNet backbone (baseline) against the triplet-loss fine-tuned model on the same protocol "
             "(DESIGN.md §2). Exact ranking, relevance = same class. `alpha-qe` = α query expansion "
             "(top-5, α = 3) where the protocol has separate queries; `alpha-dba+qe` = α database augmentation "
             "(each database vector averaged with its nearest others, α = 3) before it.", "",
             records_markdown(rows), ""]
    runs = {}
    for r in records:
        if r["model"] != "baseline" and r.get("variant") not in SEARCH_VARIANTS:
            runs[figures_name(r["run"], r.get("flip"))] = r
    lines += ["## Fine-tuned models", "", "| run | protocol | trains | loss | dim | margin | lr | epochs | "
              "train s | val MAP@R | adapted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in {r["run"]: r for r in runs.values()}.items():  # a run compared with and without flip: once
        c = r["config"]
        train_from = r.get("train_from")
        trains = {None: "head", END_TO_END: "end to end"}.get(train_from, f"top from `{train_from}` + head")
        if train_from is None and c["model"]["weights"] not in (None, "imagenet"):
            trains = f"head on a fine-tuned trunk (`{os.path.basename(c['model']['weights'])}`)"
        if c.get("randaugment"):
            trains += f", RandAugment {c['randaugment']:g}"
        dim = f"{r['hash_bits']} bits" if r.get("hash_bits") else r["embedding_dim"]  # the row's vectors (fused: more)
        loss = c["mining"] + (f" + {c['proxy_loss']}" if c.get("proxy_loss") else "")
        lines.append(f"| {name} | {r['protocol']} | {trains} | {loss} | {dim} | {c['margin']} | "
                     f"{c['learning_rate']} | {r['train_epochs']} | {r['train_seconds']:.0f} | "
                     f"{_validation(r)} | {r.get('variant') or '–'} |")
    lines += ["", f"Machine: {records[0]['machine'] if records else '?'}.", "", "Commands:", ""]
    lines += [f"    {command}" for command in dict.fromkeys(r["command"] for r in records)] + [""]
    trainings = dict.fromkeys(step["train_command"] for r in runs.values()
                              for step in r.get("starts_from", []) + [r] if step.get("train_command"))
    if trainings:
        lines += ["Training commands (a run that starts from another run's trunk comes after that run):", ""]
        if any("--recipe" in command for command in trainings):
            lines += ["A `--recipe` command trains the recipe as it stood when the run was trained; each record's "
                      "`config` is the run's whole TrainConfig, which `tfr train --config FILE` trains again.", ""]
        lines += [f"    {command}" for command in trainings] + [""]
    for name, r in runs.items():
        title = r["run"] + (" + flip" if r.get("flip") else "")
        lines += [f"## {title} ({r['protocol']})", "", f"![precision-recall]({name}-pr.png)", "",
                  f"![embedding maps]({name}-map.png)", "", f"![queries]({name}-grid.png)", ""]
    return "\n".join(lines)


def _validation(record: dict) -> str:
    """The report's validation column: the run's best validation MAP@R, or a dash for a run without validation."""
    score = record.get("validation_map_at_r")
    return "– (none held out)" if score is None else f"{score:.3f}"


def figures_name(run: str, flip: bool | None = False) -> str:
    """The file stem of a run's figures (`<run>-pr.png`, ...); a comparison with test-time flip has its own."""
    return run + ("-flip" if flip else "")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(curves: dict, title: str, path: str) -> None:
    """Precision against recall, one line per (model, variant)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for (model, variant), curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], label=model + (f" + {variant}" if variant else ""),
                linestyle="--" if variant else "-")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of `vectors`."""
    centred = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_embedding_maps(spaces: dict, protocol: Protocol, path: str, *, sample: int = 2000, seed: int = 0) -> None:
    """PCA maps of the database embeddings of each model, coloured by class."""
    plt = _pyplot()
    labels = protocol.collection.labels[protocol.database]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(labels), size=min(sample, len(labels)), replace=False))
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4.5))
    for ax, (model, (database, _)) in zip(np.atleast_1d(axes), spaces.items()):
        points, size = database[chosen], f"{database.shape[1]}-d"
        if points.dtype == np.uint8:  # packed binary codes: their bits
            points = np.unpackbits(points, axis=1)
            size = f"{points.shape[1]}-bit"
        points = pca_2d(np.asarray(points, np.float64))
        ax.scatter(points[:, 0], points[:, 1], c=labels[chosen], cmap="tab20", s=4, alpha=0.7)
        ax.set(title=f"{model} ({size}), PCA", xticks=[], yticks=[])
    fig.suptitle(f"{protocol.name}: database embeddings, {len(chosen)} points coloured by class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_query_grids(spaces: dict, protocol: Protocol, path: str, *, queries: int = 4, k: int = 10, seed: int = 0,
                     metrics: dict | None = None) -> None:
    """For a few random queries: the query, then each model's top-k (green frame = same class, red = other)."""
    from tf_retrieval.search.index import build_index

    plt = _pyplot()
    collection = protocol.collection
    query_positions = protocol.database if protocol.queries is None else protocol.queries
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(query_positions), size=min(queries, len(query_positions)), replace=False)
    models = list(spaces)
    fig, axes = plt.subplots(len(picked) * len(models), k + 1, figsize=(1.3 * (k + 1), 1.45 * len(picked) * len(models)),
                             squeeze=False)
    for qi, row in enumerate(picked):
        query_position = query_positions[row]
        query_label = collection.labels[query_position]
        for mi, model in enumerate(models):
            database, query_vectors = spaces[model]
            index = build_index(database, metric=(metrics or {}).get(model, "cosine"), backend="exact")
            exclude = 1 if protocol.queries is None else 0  # leave-one-out: skip the query itself
            _, ids = index.search(query_vectors[row:row + 1], k + exclude)
            found = [protocol.database[i] for i in ids[0] if i >= 0 and not (exclude and i == row)][:k]
            axes_row = axes[qi * len(models) + mi]
            _show(axes_row[0], collection.image(query_position), f"query\n{model}", "black")
            for ax, position in zip(axes_row[1:], found):
                same = collection.labels[position] == query_label
                _show(ax, collection.image(position), collection.class_names[collection.labels[position]][:12],
                      "green" if same else "red")
    fig.suptitle(f"{protocol.name}: query -> top-{k} (green: same class)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _show(ax, image: np.ndarray, title: str, colour: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)

