"""Retrieval metrics over ranked results, vectorised over queries.

Every function takes a boolean *relevance matrix* [q, k] (row i: is the j-th ranked result relevant to query i, best first) and,
where recall is involved, `num_relevant` [q]: how many relevant items the database holds for each query. Functions return one
value per query; `RetrievalMetrics` accumulates chunks of queries and averages. Queries with no relevant item get 0 from every
function and are left out (and counted) by `RetrievalMetrics`.
"""
from __future__ import annotations

import numpy as np

from tf_retrieval.errors import InvalidInputError


def relevance_matrix(query_labels: np.ndarray, ranked_labels: np.ndarray) -> np.ndarray:
    """bool [q, k]: ranked_labels[i, j] == query_labels[i]."""
    query_labels, ranked_labels = np.asarray(query_labels), np.asarray(ranked_labels)
    if ranked_labels.ndim != 2 or query_labels.shape != ranked_labels.shape[:1]:
        raise InvalidInputError(f"expected query labels [q] and ranked labels [q, k], got {query_labels.shape} and "
                         f"{ranked_labels.shape}")
    return ranked_labels == query_labels[:, None]


def _check(relevance: np.ndarray, num_relevant: np.ndarray | None = None, k: int | None = None):
    relevance = np.asarray(relevance, dtype=bool)
    if relevance.ndim != 2:
        raise InvalidInputError(f"relevance must be a [queries, ranked] matrix, got shape {relevance.shape}")
    if k is not None and not 0 < k <= relevance.shape[1]:
        raise InvalidInputError(f"k must be in 1..{relevance.shape[1]} (the ranked columns given), got {k}")
    if num_relevant is None:
        return relevance, None
    num_relevant = np.asarray(num_relevant, dtype=np.float64)
    if num_relevant.shape != relevance.shape[:1]:
        raise InvalidInputError(f"num_relevant must have one value per query ({relevance.shape[0]}), got shape {num_relevant.shape}")
    return relevance, num_relevant


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


def precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the top k that is relevant."""
    relevance, _ = _check(relevance, k=k)
    return relevance[:, :k].sum(axis=1) / k


def recall_at_k(relevance: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Fraction of all relevant items found in the top k (0 when there are none)."""
    relevance, num_relevant = _check(relevance, num_relevant, k)
    return _safe_divide(relevance[:, :k].sum(axis=1).astype(np.float64), num_relevant)


def f1_at_k(relevance: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Harmonic mean of P@k and R@k (0 where both are 0)."""
    precision, recall = precision_at_k(relevance, k), recall_at_k(relevance, num_relevant, k)
    return _safe_divide(2 * precision * recall, precision + recall)


def average_precision(relevance: np.ndarray, num_relevant: np.ndarray, k: int | None = None,
                      normalize: str = "relevant") -> np.ndarray:
    """Average precision over the ranking (k=None: all given columns; a full ranking gives AP@all).

    AP@k = sum_{i<=k} P(i) rel(i) / N. With normalize="relevant" (default), N = min(num_relevant, k) — for k=None,
    N = num_relevant, the standard AP (equal to sklearn's `average_precision_score` on a full ranking). With
    normalize="retrieved", N = the number of relevant items within the top k, the convention of the deep-hashing
    evaluation code (DSH, HashNet) for mAP@k.
    """
    relevance, num_relevant = _check(relevance, num_relevant, k)
    if normalize not in ("relevant", "retrieved"):
        raise InvalidInputError(f"normalize must be 'relevant' or 'retrieved', got {normalize!r}")
    top = relevance if k is None else relevance[:, :k]
    hits = np.cumsum(top, axis=1, dtype=np.float64)
    ranks = np.arange(1, top.shape[1] + 1, dtype=np.float64)
    summed = (hits / ranks * top).sum(axis=1)
    if normalize == "retrieved":
        return _safe_divide(summed, hits[:, -1])
    return _safe_divide(summed, np.minimum(num_relevant, top.shape[1]))


def map_at_r(relevance: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): (1/R) sum_{i<=R} P(i) rel(i), R = num_relevant."""
    relevance, num_relevant = _check(relevance, num_relevant)
    if num_relevant.size and num_relevant.max() > relevance.shape[1]:
        raise InvalidInputError(f"MAP@R needs at least R = {int(num_relevant.max())} ranked columns, got {relevance.shape[1]}")
    ranks = np.arange(1, relevance.shape[1] + 1)
    within_r = ranks[None, :] <= num_relevant[:, None]
    top = relevance & within_r
    precision = np.cumsum(top, axis=1, dtype=np.float64) / ranks
    return _safe_divide((precision * top).sum(axis=1), num_relevant)


def r_precision(relevance: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """Precision at R = num_relevant."""
    relevance, num_relevant = _check(relevance, num_relevant)
    if num_relevant.size and num_relevant.max() > relevance.shape[1]:
        raise InvalidInputError(f"R-precision needs at least R = {int(num_relevant.max())} ranked columns, got {relevance.shape[1]}")
    within_r = np.arange(1, relevance.shape[1] + 1)[None, :] <= num_relevant[:, None]
    return _safe_divide((relevance & within_r).sum(axis=1).astype(np.float64), num_relevant)


def recall_at(relevance: np.ndarray, ks=(1, 2, 4, 8)) -> dict[int, np.ndarray]:
    """Metric-learning "Recall@K": 1 if any of the top K is relevant, else 0 — per query, for each K."""
    relevance, _ = _check(relevance)
    first_hit = np.where(relevance.any(axis=1), relevance.argmax(axis=1), relevance.shape[1])
    for k in ks:
        _check(relevance, k=k)
    return {k: (first_hit < k).astype(np.float64) for k in ks}


def default_cutoffs(columns: int) -> np.ndarray:
    """A cut-off grid for PR curves: 1..10, then ~40 log-spaced points up to `columns`."""
    grid = np.unique(np.concatenate([np.arange(1, min(10, columns) + 1),
                                     np.geomspace(1, columns, num=40).round().astype(int)]))
    return grid[(grid >= 1) & (grid <= columns)]


def pr_curve(relevance: np.ndarray, num_relevant: np.ndarray, points=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean precision and mean recall at the cut-offs `points` (default `default_cutoffs`)."""
    relevance, num_relevant = _check(relevance, num_relevant)
    points = default_cutoffs(relevance.shape[1]) if points is None else np.asarray(points)
    hits = np.cumsum(relevance, axis=1, dtype=np.float64)[:, points - 1]
    return (hits / points).mean(axis=0), _safe_divide(hits, num_relevant[:, None]).mean(axis=0)


class RetrievalMetrics:
    """Accumulates metrics over chunks of queries and averages them.

    Args:
      ks: Recall@K cut-offs.
      precision_ks: P@k cut-offs.
      map_k: also report mAP@map_k (normalised by min(num_relevant, k)).
    """

    def __init__(self, ks=(1, 2, 4, 8), precision_ks=(10, 100), map_k: int | None = None):
        self.ks, self.precision_ks, self.map_k = tuple(ks), tuple(precision_ks), map_k
        self._sums: dict[str, float] = {}
        self._queries = 0
        self._skipped = 0
        self._curve_points: np.ndarray | None = None
        self._curve_sums = None

    def update(self, relevance: np.ndarray, num_relevant: np.ndarray) -> None:
        """Adds one chunk of queries; queries without any relevant item are skipped and counted."""
        relevance, num_relevant = _check(relevance, num_relevant)
        keep = num_relevant > 0
        self._skipped += int((~keep).sum())
        relevance, num_relevant = relevance[keep], num_relevant[keep]
        if not len(relevance):
            return
        columns = relevance.shape[1]
        values = {"mAP": average_precision(relevance, num_relevant),
                  "MAP@R": map_at_r(relevance, num_relevant),
                  "R-precision": r_precision(relevance, num_relevant)}
        if self.map_k:
            values[f"mAP@{self.map_k}"] = average_precision(relevance, num_relevant, min(self.map_k, columns))
        for k in self.precision_ks:
            if k <= columns:
                values[f"P@{k}"] = precision_at_k(relevance, k)
        values.update({f"R@{k}": v for k, v in recall_at(relevance, [k for k in self.ks if k <= columns]).items()})
        for name, per_query in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(per_query.sum())
        if self._curve_points is None:
            self._curve_points = default_cutoffs(columns)
            self._curve_sums = [np.zeros(len(self._curve_points)), np.zeros(len(self._curve_points))]
        precision, recall = pr_curve(relevance, num_relevant, self._curve_points)
        self._curve_sums[0] += precision * len(relevance)
        self._curve_sums[1] += recall * len(relevance)
        self._queries += len(relevance)

    def result(self) -> dict[str, float]:
        """Mean of each metric over the scored queries, plus "queries" and "skipped_queries" counts."""
        means = {name: total / self._queries for name, total in self._sums.items()} if self._queries else {}
        return {**means, "queries": self._queries, "skipped_queries": self._skipped}

    def pr_curve(self) -> dict[str, list]:
        """Mean precision and recall at the cut-offs "k"."""
        if self._curve_points is None:
            return {"k": [], "precision": [], "recall": []}
        return {"k": self._curve_points.tolist(),
                "precision": (self._curve_sums[0] / self._queries).round(5).tolist(),
                "recall": (self._curve_sums[1] / self._queries).round(5).tolist()}
