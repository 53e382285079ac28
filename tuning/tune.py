"""Search the Siamese head's embedding size, margin, learning rate, mining and hidden width with keras-tuner.

`tune` runs the search on cached training-set features and writes, under its output directory:

- `tuner/`: keras-tuner's state (one folder per trial, with the trial's full epoch history in `tfr_history.json`).
  Running `tune` again with the same directory resumes: finished trials are kept, and a larger `trials` adds more.
- `best_config.json`: the best trial as a `TrainConfig` (base config + the searched values), which
  `tfr train --config best_config.json` trains unchanged.
- `trials.json`, `tuning.md`, `tuning.png`: every trial's values, validation MAP@R and the index cost of its
  embedding size, as JSON, as a Markdown table, and as a plot of embedding size vs MAP@R, index memory and query latency.

Index cost (`measure_index_cost`) depends on the embedding size and the database size only, so it is measured once per
size on random unit vectors of that size: an index of `database_size` vectors is built with `tf_retrieval.search.index.build_index`
(ScaNN when installed, with the same size-dependent settings the product uses), then timed on single queries (k=10, the
median over 200) and saved; its size on disk (vectors, ids and ScaNN's serialised searcher: what loading it puts in
memory) is the memory figure, in MB (10^6 bytes).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable

import keras_tuner
import numpy as np

from tf_retrieval.config import TrainConfig
from tf_retrieval.errors import InvalidInputError
from tf_retrieval.storage import write_json, write_text
from tf_retrieval.tuning.hypermodel import OBJECTIVE, SearchSpace, SiameseHyperModel, check_tunable

logger = logging.getLogger(__name__)

ALGORITHMS = ("bayesian", "random", "hyperband")
HISTORY_FILE = "tfr_history.json"
SEARCH_FILE = "search.json"
#: The TrainConfig fields the search sets (`SearchSpace`): a base config's values of these are not used.
SEARCHED = ("embedding_dim", "hidden_dim", "mining", "margin", "learning_rate")


@dataclasses.dataclass
class TuneResult:
    """What `tune` produced.

    Attributes:
      best_config: the best trial's `TrainConfig` (also saved as `config_path`).
      best_score: its validation MAP@R.
      trials: one record per finished trial (see `tune`), in trial order.
      out_dir, config_path, table_path, plot_path: where the results are.
      seconds: wall time of this call (resumed trials excluded).
    """

    best_config: TrainConfig
    best_score: float
    trials: list[dict[str, Any]]
    out_dir: str
    config_path: str
    table_path: str
    plot_path: str
    seconds: float


class _TrialRecorder:
    """Tuner mixin: keeps each trial's epoch history in its trial folder and reports one line per trial."""

    def __init__(self, *args, progress: Callable[[str], None] | None = None, **kwargs):
        self._progress = progress
        self._started: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def on_trial_begin(self, trial):
        self._started[trial.trial_id] = time.perf_counter()
        super().on_trial_begin(trial)

    def run_trial(self, trial, *args, **kwargs):
        histories = super().run_trial(trial, *args, **kwargs)
        seconds = time.perf_counter() - self._started.get(trial.trial_id, time.perf_counter())
        record = {"history": [{k: [float(v) for v in vs] for k, vs in h.history.items()} for h in histories],
                  "seconds": round(seconds, 2)}
        write_json(os.path.join(self.get_trial_dir(trial.trial_id), HISTORY_FILE), record)
        return histories

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if self._progress is not None:
            self._progress(self._summary(self.oracle.get_trial(trial.trial_id)))

    def _summary(self, trial) -> str:
        values = trial.hyperparameters.values
        total = self.oracle.max_trials
        head = f"trial {int(trial.trial_id) + 1}{f'/{total}' if total else ''}: " + _describe(values)
        seconds = time.perf_counter() - self._started.get(trial.trial_id, time.perf_counter())
        if trial.score is None:
            reason = (trial.message or "").strip().splitlines()[-1:] or ["no score"]
            return f"{head} -> {trial.status.lower()}: {reason[0]} ({seconds:.0f} s)"
        best = self.oracle.get_best_trials(1)
        best_text = f"{best[0].score:.4f}" if best else "n/a"
        return f"{head} -> val MAP@R {trial.score:.4f} (best {best_text}) in {seconds:.0f} s"


def _describe(values: dict[str, Any]) -> str:
    return (f"d={values.get('embedding_dim')} hidden={values.get('hidden_dim')} {values.get('mining')} "
            f"margin={values.get('margin', float('nan')):.2f} lr={values.get('learning_rate', float('nan')):.1e}")


def make_tuner(hypermodel: SiameseHyperModel, directory: str, *, algorithm: str = "bayesian", trials: int = 20,
               overwrite: bool = False, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> keras_tuner.Tuner:
    """A keras-tuner tuner maximising `val_map_at_r`, with its state under `directory/search` (resumable).

    Args:
      hypermodel: the hypermodel to tune.
      directory: tuner directory; an existing search there is resumed unless `overwrite`.
      algorithm: "bayesian" (Gaussian-process Bayesian optimisation), "random", or "hyperband" (successive halving of
        epoch budgets, up to the base config's `epochs`). A Hyperband trial that continues an earlier one starts from
        that trial's best weights, as keras-tuner restores them, with a fresh optimizer (Adam's moments start at zero).
      trials: at most this many trials (in all, counting those of a resumed search).
      overwrite: start afresh, deleting the search state in `directory`.
      seed: seeds the search.
      progress: called with one line per finished trial.

    Raises:
      ValueError: unknown algorithm or a non-positive number of trials.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidInputError(f"unknown tuning algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if trials < 1:
        raise InvalidInputError(f"trials must be positive, got {trials}")
    common = dict(hypermodel=hypermodel, objective=OBJECTIVE, seed=seed, directory=directory, project_name="search",
                  overwrite=overwrite, progress=progress)
    if algorithm == "bayesian":
        tuner = _Bayesian(max_trials=trials, num_initial_points=min(10, max(2, trials // 3)), **common)
    elif algorithm == "random":
        tuner = _Random(max_trials=trials, **common)
    else:
        tuner = _Hyperband(max_epochs=max(2, hypermodel.base.epochs), factor=3, **common)
        tuner.oracle.max_trials = trials  # Hyperband has no trial budget of its own; the oracle stops at this one
    return tuner


class _Bayesian(_TrialRecorder, keras_tuner.BayesianOptimization):
    pass


class _Random(_TrialRecorder, keras_tuner.RandomSearch):
    pass


class _Hyperband(_TrialRecorder, keras_tuner.Hyperband):
    pass


def measure_index_cost(dim: int, database_size: int, *, backend: str = "auto", queries: int = 200, k: int = 10,
                       seed: int = 0) -> dict[str, Any]:
    """Memory and single-query latency of an index of `database_size` random unit vectors of dimension `dim`.

    Returns:
      {"embedding_dim", "database_size", "backend", "index_mb" (saved size, MB), "index_ms_per_query" (median of
      `queries` single-vector searches), "build_s" (building + ScaNN training)}.
    """
    from tf_retrieval.search.index import build_index

    if database_size < 1:
        raise InvalidInputError(f"database_size must be positive, got {database_size}")
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    k = min(k, database_size)
    start = time.perf_counter()
    index = build_index(unit(database_size), backend=backend)
    probes = unit(queries + 1)
    index.search(probes[:1], k)  # ScaNN trains lazily at the first search
    build_s = time.perf_counter() - start
    times = []
    for row in probes[1:]:
        t0 = time.perf_counter()
        index.search(row[None], k)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(os.path.join(tmp, "index"), model_id=f"random-unit-{dim}d")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp) for f in files)
    return {"embedding_dim": int(dim), "database_size": int(database_size), "backend": index.backend,
            "index_mb": round(size / 1e6, 3), "index_ms_per_query": round(float(np.median(times)) * 1e3, 4),
            "build_s": round(build_s, 3)}


def tune(base: TrainConfig, inputs: np.ndarray, labels: np.ndarray, out_dir: str, *, trials: int = 20,
         algorithm: str = "bayesian", space: SearchSpace | None = None, database_size: int | None = None,
         index_backend: str = "auto", overwrite: bool = False, verbose: int = 0,
         progress: Callable[[str], None] | None = print, title: str | None = None,
         class_disjoint: bool | None = None) -> TuneResult:
    """Searches the head's hyperparameters on `inputs` / `labels` and writes the results under `out_dir`.

    Args:
      base: the settings that are not searched; the best config is this one with the best trial's values.
      inputs: cached inputs of the protocol's training set (`train.cache_inputs(...)[protocol.train]`).
      labels: their labels. The validation split is taken from them as in `tfr train`.
      out_dir: output directory (see the module docstring); an unfinished search there is resumed unless `overwrite`.
      trials: total number of trials (a resumed search runs only the missing ones).
      algorithm: "bayesian", "random" or "hyperband" (see `make_tuner`).
      space: the search space (default `SearchSpace()`).
      database_size: vectors in the index whose cost is measured (default: len(inputs)); the protocol's database size.
      index_backend: backend of that index ("auto", "exact" or "scann").
      overwrite: discard an earlier search in `out_dir`.
      verbose: Keras' fit verbosity inside trials.
      progress: called with one line per finished trial (None: quiet).
      title: first line of the Markdown table and the plot (default: the base protocol).
      class_disjoint: validate on whole held-out classes (default: when there are many; see `train.validation_split`).

    Returns:
      a `TuneResult`. Each trial record holds trial_id, the searched values (embedding_dim, hidden_dim, mining,
      margin, learning_rate), "MAP@R" (the trial's best validation MAP@R, i.e. keras-tuner's score), best_epoch, epochs,
      seconds, index_mb and index_ms_per_query.

    Raises:
      ValueError: bad arguments, no finished trial, or `out_dir` holding a search with another base config, search
        space, algorithm or training set (pass `overwrite=True` or choose another directory).
    """
    start = time.perf_counter()
    space = space or SearchSpace()
    hypermodel = SiameseHyperModel(base, inputs, labels, space, class_disjoint=class_disjoint)
    database_size = int(database_size or len(inputs))
    tuner_dir = os.path.join(out_dir, "tuner")
    _check_same_search(tuner_dir, {
        "base": base.to_dict(), "space": space.to_dict(), "algorithm": algorithm,
        "inputs_shape": list(np.shape(inputs)), "labels_digest": _digest(np.asarray(labels))}, overwrite)
    tuner = make_tuner(hypermodel, tuner_dir, algorithm=algorithm, trials=trials, overwrite=overwrite, seed=base.seed,
                       progress=progress)
    if progress is not None:
        split = "class-disjoint" if hypermodel.class_disjoint else "stratified"
        progress(f"tuning {algorithm}: {trials} trials on {len(hypermodel.train_labels)} training images, validation "
                 f"MAP@R on {len(hypermodel.val_labels)} images of {hypermodel.validation_classes} classes ({split})")
    tuner.search(verbose=verbose)

    records = _trial_records(tuner)
    if not records:
        raise InvalidInputError(f"no trial finished (see the trial folders under {tuner.project_dir})")
    costs: dict[int, dict[str, Any]] = {}
    for record in records:
        dim = record["embedding_dim"]
        if dim not in costs:
            costs[dim] = measure_index_cost(dim, database_size, backend=index_backend)
        record.update(index_mb=costs[dim]["index_mb"], index_ms_per_query=costs[dim]["index_ms_per_query"])

    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_config = hypermodel.trial_config(best_trial.hyperparameters)
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "best_config.json")
    best_config.save(config_path)
    write_json(os.path.join(out_dir, "trials.json"), {
        "base": base.to_dict(), "space": space.to_dict(), "algorithm": algorithm, "database_size": database_size,
        "index_backend": sorted({c["backend"] for c in costs.values()}), "best_trial": best_trial.trial_id,
        "trials": records}, indent=1)
    title = title or f"{base.protocol}: {algorithm} search, {len(records)} trials"
    table_path = os.path.join(out_dir, "tuning.md")
    write_text(table_path, tuning_markdown(records, best_trial.trial_id, title=title, database_size=database_size,
                                           backend=", ".join(sorted({c["backend"] for c in costs.values()}))))
    plot_path = os.path.join(out_dir, "tuning.png")
    plot_tuning(records, plot_path, title=title, database_size=database_size)
    result = TuneResult(best_config, float(best_trial.score), records, out_dir, config_path, table_path, plot_path,
                        time.perf_counter() - start)
    logger.info("best of %d trials: val MAP@R %.4f with %s", len(records), result.best_score,
                _describe(best_trial.hyperparameters.values))
    return result


def tune_protocol(base: TrainConfig, out_dir: str, *, workdir: str, trials: int = 20, algorithm: str = "bayesian",
                  index_backend: str = "auto", overwrite: bool = False, verbose: bool = False) -> TuneResult:
    """`tfr tune`: `tune` on the training set of the protocol of `base`, with its inputs cached under `workdir` and
    one line per trial (per epoch too with `verbose`)."""
    from tf_retrieval.data.protocols import load_protocol
    from tf_retrieval.training.train import cache_inputs

    if trials < 1:
        raise InvalidInputError(f"--trials must be positive, got {trials}")
    check_tunable(base)  # before any caching
    protocol = load_protocol(base.protocol, base.source)
    inputs = cache_inputs(base, protocol.collection, workdir=workdir)
    labels = protocol.collection.labels
    quiet = [] if verbose else [logging.getLogger(name) for name in ("tf_retrieval.training.train",
                                                                     "tf_retrieval.search.index")]
    levels = [logger_.level for logger_ in quiet]
    for logger_ in quiet:  # one line per trial, not per epoch
        logger_.setLevel(logging.WARNING)
    try:
        return tune(base, inputs[protocol.train], labels[protocol.train], out_dir, trials=trials, algorithm=algorithm,
                    database_size=len(protocol.database), index_backend=index_backend, overwrite=overwrite,
                    verbose=2 if verbose else 0, class_disjoint=protocol.class_disjoint or None,
                    title=f"{protocol.summary()} ({base.model.backbone}, {base.model.image_size} px)")
    finally:
        for logger_, level in zip(quiet, levels):
            logger_.setLevel(level)


def _trial_records(tuner: keras_tuner.Tuner) -> list[dict[str, Any]]:
    records = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda item: int(item[0])):
        if trial.score is None or trial.status != "COMPLETED":
            continue
        values = trial.hyperparameters.values
        start = int(values.get("tuner/initial_epoch", 0))  # Hyperband continues earlier trials' training
        config = tuner.hypermodel.trial_config(trial.hyperparameters)  # the values as trained (e.g. rounded margin)
        record: dict[str, Any] = {"trial_id": trial_id, **{k: getattr(config, k) for k in SEARCHED},
                                  "MAP@R": float(trial.score), "best_epoch": start + trial.best_step + 1}
        history_path = os.path.join(tuner.get_trial_dir(trial_id), HISTORY_FILE)
        if os.path.exists(history_path):
            with open(history_path) as f:
                saved = json.load(f)
            record.update(epochs=start + max(len(h.get("loss", [])) for h in saved["history"]),
                          seconds=saved["seconds"])
        records.append(record)
    return records


def _check_same_search(tuner_dir: str, search: dict[str, Any], overwrite: bool) -> None:
    path = os.path.join(tuner_dir, SEARCH_FILE)
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            before = json.load(f)
        as_saved = json.loads(json.dumps(search))  # tuples as lists, as the file has them
        changed = sorted(k for k in as_saved if before.get(k) != as_saved[k])
        if changed:
            raise InvalidInputError(f"{tuner_dir} holds a search with another {', '.join(changed)}; resume it with the same "
                             f"settings, or use another output directory or --overwrite")
    write_json(path, search, indent=1)


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def tuning_markdown(records: list[dict[str, Any]], best_trial: str | None = None, *, title: str = "",
                    database_size: int | None = None, backend: str = "") -> str:
    """A Markdown table of the trials, best validation MAP@R first."""
    lines = [f"# {title}" if title else "# Tuning", ""]
    if database_size:
        lines += [f"Index cost: an index of {database_size:,} random unit vectors of each embedding size "
                  f"({backend or 'auto'} backend); memory = saved size, latency = median single query, k=10.", ""]
    lines += ["| trial | embedding dim | hidden | mining | margin | learning rate | val MAP@R | epochs | "
              "index MB | ms / query |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: -r["MAP@R"]):
        mark = " (best)" if r["trial_id"] == best_trial else ""
        lines.append(f"| {r['trial_id']}{mark} | {r['embedding_dim']} | {r['hidden_dim']} | {r['mining']} | "
                     f"{r['margin']:.2f} | {r['learning_rate']:.2e} | {r['MAP@R']:.4f} | {r.get('epochs', '')} | "
                     f"{r.get('index_mb', float('nan')):.2f} | {r.get('index_ms_per_query', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def plot_tuning(records: list[dict[str, Any]], path: str, *, title: str = "", database_size: int | None = None) -> None:
    """Three panels against the embedding size (log2 axis): validation MAP@R of every trial (and the best per size),
    index memory (MB) and query latency (ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = np.array([r["embedding_dim"] for r in records])
    sizes = sorted(set(dims.tolist()))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for mining, marker in zip(("semihard", "hard", "batch-all"), "o^s"):
        chosen = [r for r in records if r["mining"] == mining]
        if chosen:
            ax.scatter([r["embedding_dim"] for r in chosen], [r["MAP@R"] for r in chosen], marker=marker, alpha=0.7,
                       label=mining)
    ax.plot(sizes, [max(r["MAP@R"] for r in records if r["embedding_dim"] == d) for d in sizes], "k--", lw=1,
            label="best per size")
    ax.set_ylabel("validation MAP@R")
    ax.legend(fontsize=8)
    per_size = {r["embedding_dim"]: r for r in records}
    for ax, key, label in ((axes[1], "index_mb", "index memory (MB)"),
                           (axes[2], "index_ms_per_query", "ms per query (k=10)")):
        ax.plot(sizes, [per_size[d].get(key, math.nan) for d in sizes], "o-")
        ax.set_ylabel(label)
    database = f" (database {database_size:,})" if database_size else ""
    for ax, name in zip(axes, ("retrieval quality", "index memory" + database, "query latency" + database)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(d) for d in sizes])
        ax.set_xlabel("embedding size")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
